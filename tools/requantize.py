"""Requantise a GGUF file with llama.cpp's own quantiser (llama-cpp-python's llama_model_quantize), e.g.
SmolLM2-135M-Instruct Q4_1 to Q4_K_M, the mix of K-quants (and their Q5_0 / Q8_0 fallbacks for rows
not a multiple of 256) that people download. Prints the output path.

    python tools/requantize.py ~/.cache/hybridinfer/SmolLM2-135M-Instruct.Q4_1.gguf --type Q4_K_M

Needs llama-cpp-python (`pip install -e '.[llamacpp]'`). The output is written to a temporary name
and renamed at the end, so a failed run leaves no partial file.
"""

import argparse
import ctypes
import os
import sys
from pathlib import Path

TYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q3_K_M", "Q2_K", "Q5_0", "Q5_1", "Q6_K")


def requantize(src: Path, dst: Path, ftype: str = "Q4_K_M") -> Path:
    """dst = src requantised by llama.cpp to ftype (one of TYPES); returns dst, kept if it exists."""
    import llama_cpp
    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True  # the source is already quantised
    params.nthread = 2
    part = dst.with_name(dst.name + ".part")
    dst.parent.mkdir(parents=True, exist_ok=True)
    stderr = os.dup(2)
    try:
        with open(os.devnull, "w") as null:  # llama.cpp logs every tensor on the C stderr
            os.dup2(null.fileno(), 2)
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), ctypes.byref(params))
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
    if rc != 0:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize failed on {src} (code {rc})")
    part.rename(dst)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--type", choices=TYPES, default="Q4_K_M")
    parser.add_argument("-o", "--output", type=Path, help="default: MODEL's name with .TYPE.gguf")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"{args.model} is not a file")
    stem = args.model.name.removesuffix(".gguf").rsplit(".", 1)[0]
    out = args.output or args.model.with_name(f"{stem}.{args.type}.gguf")
    if out.resolve() == args.model.resolve():
        parser.error("the output path is the input file")
    try:
        print(requantize(args.model, out, args.type))
    except ImportError:
        sys.exit("requantize.py needs llama-cpp-python: pip install -e '.[llamacpp]'")


if __name__ == "__main__":
    main()
