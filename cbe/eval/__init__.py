"""QA evaluation: parsing and metrics (pure functions over strings) and the backend-agnostic QAEvaluator."""
