"""User mistakes end the run with one line that says what to do, never a traceback."""

import functools
import re
import sys

# How a user gives the hub their token: the hint of every hub refusal (downloads, uploads).
LOG_IN = "log in with `hf auth login` (or set HF_TOKEN)"


class UserError(Exception):
    """A mistake the user can fix: bad config, missing file, malformed data, no access."""


def one_line(text: object) -> str:
    """Collapse a multi-line library message into one line."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def exit_with(message: object, code: int = 2) -> None:
    """Print `cbe: error: <message>` on stderr and exit non-zero."""
    sys.stderr.write(f"cbe: error: {one_line(message)}\n")
    sys.stderr.flush()
    sys.exit(code)


def describe_config_error(error: Exception) -> str:
    """One line for a Hydra/OmegaConf composition error, naming the key or the group option."""
    text = one_line(error)
    cause = error.__cause__
    if cause is not None and getattr(cause, "full_key", None):
        text = f"{one_line(str(cause).split(chr(10))[0])} (key: {cause.full_key}); {text.split(';')[0]}"
    if "Available options in" in text:  # an unknown group option: name the valid ones
        head, _, options = text.partition("Available options in")
        group, _, names = options.partition(":")
        names = names.split("Config search path")[0]
        text = f"{head.rstrip('; ')}; valid options for {group.strip()}: {names.replace(';', ',').strip(' ,')}"
    return f"{text} (`python main.py --help` lists groups and options)"


def _user_error_in(error: BaseException) -> UserError | None:
    """The UserError behind an exception, also when a library (Hydra's instantiate) wrapped it."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__
    return error


def exit_on_user_error(job):
    """Decorate a Hydra job so a UserError, raised directly or inside instantiate, becomes one line."""

    @functools.wraps(job)
    def wrapped(*args, **kwargs):
        try:
            return job(*args, **kwargs)
        except Exception as e:
            if _user_error_in(e) is None:
                raise
            exit_with(_user_error_in(e))

    return wrapped


def describe_failed_job(error: Exception) -> str:
    """One line for a submitit job that failed: its own error line and where its full log is."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("---")]
    reason = next((line.removeprefix("cbe: error: ") for line in lines if line.startswith("cbe: error: ")), lines[-1])
    log = re.search(r"with path (\S+)_result\.pkl", text)
    return f"a sweep job failed: {reason}" + (f"; its log: {log.group(1)}_log.err" if log else "")


def run_and_report_user_errors(app) -> None:
    """Run a Hydra app; report composition mistakes (bad keys, types, options) as one line and exit 2, and a
    failed SLURM/submitit job as one line pointing at its log, exit 1."""
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    try:
        app()
    except UserError as e:  # found before the app composed its config
        exit_with(e)
    except InstantiationException:
        raise  # a bug in a constructor, not a config mistake
    except (HydraException, OmegaConfBaseException) as e:
        exit_with(f"config error: {describe_config_error(e)}")
    except Exception as e:
        if not type(e).__module__.startswith("submitit."):
            raise
        exit_with(describe_failed_job(e), code=1)
