"""Train the tiny offline tokenizer for the harness's `tiny` test model.

Run `python data/sample/train_tiny_tokenizer.py` (after generate.py); it
rewrites cbe/assets/tiny_tokenizer/. Deterministic: same inputs, same files.

Byte-level BPE, so any text in any language encodes without unknowns;
Gemma-style special tokens at fixed ids (<pad>=0, <eos>=1, <bos>=2, <unk>=3)
and <bos> prepended on encode, like Gemma's tokenizer.
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "cbe", "assets", "tiny_tokenizer")
VOCAB_SIZE = 2048
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # list order = ids 0..3

# Generic English so common words get merges too, not only the sample corpus.
GENERIC_TEXT = """\
The history of the region is long and complicated. In the early years, people
lived in small villages near the river, where they grew wheat and raised sheep.
Over time, trade routes connected these villages to larger cities, and new ideas
arrived with the merchants. Scientists later studied the old records to learn
how the climate had changed, what the people had eaten, and why some towns had
grown while others were abandoned. Today, the government says it will invest in
schools, hospitals and roads, although critics argue that the plan is too
expensive. "We have to think about the next generation," one official said on
Monday. The report was published on 12 March 2024 and found that 45% of
households use the internet every day.
"""

# Training text: every corpus article, then the generic paragraph (fixed order).
with open(os.path.join(HERE, "train.jsonl"), encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f] + [GENERIC_TEXT]

tok = Tokenizer(models.BPE(unk_token="<unk>"))
# add_prefix_space=False keeps decode(encode(x)) == x exactly.
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=VOCAB_SIZE,
    special_tokens=SPECIALS,
    # All 256 byte symbols are in the vocab, so nothing is ever unknown.
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
)
tok.train_from_iterator(texts, trainer=trainer)
assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3]

# Prepend <bos> on every encode, as Gemma's tokenizer does.
bos_id = tok.token_to_id("<bos>")
tok.post_processor = processors.TemplateProcessing(
    single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
)

hf_tok = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    pad_token="<pad>",
    eos_token="<eos>",
    bos_token="<bos>",
    unk_token="<unk>",
    padding_side="right",
    model_max_length=8192,
    clean_up_tokenization_spaces=False,  # exact round-trip, no " ." clean-up
)
os.makedirs(OUT, exist_ok=True)
hf_tok.save_pretrained(OUT)
print(f"saved {len(hf_tok)} tokens to {os.path.normpath(OUT)}")
