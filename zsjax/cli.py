"""The shared command line of the config-driven programs (`zsjax.train`, `zsjax.sft`):

    python -m zsjax.PROGRAM --config configs/FILE.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]

Flags are defined only when a program runs, so the programs can be imported together.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import traceback
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from zsjax.errors import InputError, Stopped, check_workdir  # noqa: F401  (re-exported)

_HELP = ("-h", "--help", "--helpshort", "--helpfull")


def repo_config(name: str, arg: str = ""):
    """configs/NAME.py's get_config(arg), from the repository beside the package (any working
    directory): how the demo and the recipes build their stages' configs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "configs", f"{name}.py")
    if not os.path.isfile(path):
        raise InputError(f"{path} not found: the demo and the recipes read their configs from "
                         "the repository's configs/ folder (run them from a clone)")
    if root not in sys.path:  # the config files import each other as `configs.*`
        sys.path.append(root)
    spec = importlib.util.spec_from_file_location(f"zsjax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _config_imports_from_its_repository(argv) -> None:
    """Puts the folder above the --config file's folder on sys.path: the config files import
    each other as `configs.*`, which otherwise works from the repository root only."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        root = os.path.dirname(os.path.dirname(os.path.abspath(value.split(":", 1)[0])))
        if root not in sys.path:
            sys.path.append(root)
        return


def run_config_program(run: Callable[[object, str], object], *,
                       multiprocess: bool = False) -> None:
    """Parses --config (locked: misspelt keys are errors) and --workdir, then calls
    run(config, workdir). With `multiprocess`, also the flags that join this process to a
    multi-process JAX program (zsjax.distributed), which is initialised first."""
    _config_imports_from_its_repository(sys.argv)
    config_flags.DEFINE_config_file("config", None, "an ml-collections config file, "
                                    "FILE.py[:ARG]", lock_config=True)
    flags.DEFINE_string("workdir", None, "output folder")
    flags.mark_flags_as_required(["config"])
    if multiprocess:
        flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0, for a "
                            "multi-process run (auto-detected under SLURM and on TPU VMs)")
        flags.DEFINE_integer("num_processes", 0, "number of processes of the run")
        flags.DEFINE_integer("process_id", -1, "this process's index, 0 .. num_processes - 1")
        flags.DEFINE_float("initialization_timeout", 300.0, "seconds to wait for every "
                           "process to join before failing")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if flags.FLAGS.workdir is None:
            raise app.UsageError("--workdir is required")
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        try:
            if multiprocess:
                from zsjax import distributed
                f = flags.FLAGS
                try:
                    distributed.initialize(f.coordinator_address, f.num_processes,
                                           f.process_id, f.initialization_timeout)
                except ValueError as e:
                    raise InputError(str(e)) from None
            try:
                config = flags.FLAGS.config
                config.keys()  # a file config_flags could not load raises on first use
            except OSError as e:  # config_flags reports a file it cannot load only when read
                raise InputError(f"cannot load --config: {_last_line(e)}") from None
            run(config, flags.FLAGS.workdir)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Stopped as e:
            print(f"stopped: {e}", file=sys.stderr)
            sys.exit(e.code)
        except FloatingPointError as e:  # the trainer's stop on repeated non-finite updates
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except RuntimeError as e:  # a search server that fails mid-run (SearchBackendError)
            from zsjax.search.http_backends import SearchBackendError
            if not isinstance(e, SearchBackendError):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(3)
        except KeyboardInterrupt:  # Ctrl-C outside the steps (loading, compiling, exporting)
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    try:
        app.run(main, flags_parser=_parse_flags)
    except SystemExit as e:
        # absl exits 1 after printing --help; a help request is a success.
        if e.code == 1 and any(a in _HELP for a in sys.argv[1:]):
            sys.exit(0)
        raise


def _parse_flags(argv):
    """absl's flag parsing, with a mistake in the flags (a misspelt --config key, a preset the
    config file does not know, a missing --config) as a one-line error and status 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 (flags.Error, or what the config file raised)
        print(f"error: {_last_line(e)}", file=sys.stderr)
        sys.exit(2)


def _last_line(e: BaseException) -> str:
    """The informative line of an error whose message may hold a traceback (absl quotes the
    config file's), or a key's quoted name and a suggestion on separate lines."""
    text = str(e.args[0] if e.args else e)
    if text[:1] in "'\"" and text[-1:] == text[:1]:  # a quoted repr (ml_collections' KeyError)
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    frames = traceback.extract_tb(e.__traceback__)
    if isinstance(e, (AttributeError, KeyError)) and lines and frames and (
            "ml_collections" in frames[-1].filename):  # an override of a key the config lacks
        return "unknown config key " + " ".join(lines)
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: {e.msg}"
    return lines[-1] if lines else type(e).__name__
