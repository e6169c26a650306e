"""Seeded fuzzer of the command line: damaged GGUF files, damaged predictor directories, odd arguments.

    python tools/fuzz.py [--cases N] [--seed S] [--limit SECONDS] [--model GGUF] [-v]

Each case runs `hybridinfer.cli.main` in this process on a variant of the default model (bytes flipped
in the header or the tensor-info region, a truncation, a metadata value or tensor entry replaced by
one of another type or range, a damaged vocabulary, garbage weights), of its predictor directory
(config.json values and safetensors headers), or on an argument list drawn from valid and invalid
values. A case must end in success or in one `error:` line with a non-zero status. A Python exception
escaping main (a traceback), a case still running after --limit seconds (a hang) or a Python warning
on stderr is a finding;
the counts of each outcome and every finding are printed. A crash would end this process.
"""

import _thread
import argparse
import contextlib
import io
import json
import shutil
import struct
import sys
import tempfile
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType as V

from hybridinfer import cli
from hybridinfer.commands.common import DEFAULT_MODEL, DEFAULT_PREDICTOR
from hybridinfer.gguf_file import SCALAR_FORMATS

# values a metadata key may be replaced with: (type, item type for arrays, value)
BAD_VALUES = [
    (V.UINT32, None, 0), (V.INT32, None, -1), (V.UINT32, None, 1), (V.UINT32, None, 3), (V.UINT32, None, 64),
    (V.UINT32, None, 2**31), (V.UINT64, None, 2**63), (V.INT64, None, -2**40), (V.FLOAT32, None, float("nan")),
    (V.FLOAT32, None, float("inf")), (V.FLOAT32, None, -1.0), (V.FLOAT32, None, 0.0), (V.FLOAT64, None, 1e300),
    (V.STRING, None, "x"), (V.STRING, None, ""), (V.STRING, None, "relu"), (V.STRING, None, "gpt2"),
    (V.BOOL, None, True), (V.ARRAY, V.INT32, [1, 2]), (V.ARRAY, V.STRING, ["a", "b"]), (V.ARRAY, V.FLOAT32, []),
]
BAD_PIECES = ["", "\x00", "a\x00b", "<0xZZ>", "<0x100>", "<unk>", "<s>", "\u2581", "\ud800", "x" * 5000]
BAD_TOKEN_TYPES = [0, 1, 2, 3, 5, 6, 7, 99, -1]
TEXT = b"And it came to pass, when the king of Israel saw the LORD. " * 8
BAD_JSON = [None, -1, 0, 1, 10**30, 1e308, float("inf"), float("nan"), "x", [], {}, True, [1, 2], 2**31]


@dataclass
class Base:
    """The default model's header as editable entries, and its tensor data as bytes."""

    kvs: list[list]  # [key, type, item type or None, value]
    infos: list[list]  # [name, dims, qtype, offset relative to the data]
    data: bytes
    raw: bytes
    info_start: int  # where the tensor-info region starts in raw
    data_start: int

    @classmethod
    def read(cls, path: Path) -> "Base":
        r = GGUFReader(path)
        kvs = [[k, f.types[0], f.types[1] if f.types[0] == V.ARRAY else None, f.contents()]
               for k, f in r.fields.items() if not k.startswith("GGUF.")]
        infos = [[t.name, [int(d) for d in t.shape], int(t.tensor_type), t.data_offset - r.data_offset]
                 for t in r.tensors]
        raw = path.read_bytes()
        return cls(kvs, infos, raw[r.data_offset:], raw, r.tensors[0].field.offset, r.data_offset)


def _value(vtype: int, value, item_type: int | None = None) -> bytes:
    if vtype == V.STRING:
        b = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(b)) + b
    if vtype == V.ARRAY:
        return struct.pack("<IQ", item_type, len(value)) + b"".join(_value(item_type, v) for v in value)
    return struct.pack(SCALAR_FORMATS[vtype], value)


def gguf_bytes(kvs: list[list], infos: list[list], data: bytes, n_dims: dict[str, int] | None = None) -> bytes:
    """A GGUF v3 file; n_dims overrides the dimension count written for some tensors."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(infos), len(kvs))]
    for key, vtype, item_type, value in kvs:
        out += [_value(V.STRING, key), struct.pack("<I", vtype), _value(vtype, value, item_type)]
    for name, dims, qtype, offset in infos:
        n = (n_dims or {}).get(name, len(dims))
        out += [_value(V.STRING, name), struct.pack(f"<I{len(dims)}QIQ", n, *dims, qtype, offset)]
    header = b"".join(out)
    return header + b"\0" * (-len(header) % 32) + data


@dataclass
class Case:
    kind: str
    argv: list[str]
    files: dict[str, bytes] = field(default_factory=dict)  # name in the case folder -> content


def _gguf_case(rng: np.random.Generator, base: Base, modes: list[str]) -> Case:
    kind = rng.choice(["flip_header", "flip_tensor_info", "truncate", "edit_key", "edit_vocab", "edit_tensor",
                       "bpe", "garbage_weights"])
    kvs = [list(kv) for kv in base.kvs]
    infos = [list(i) for i in base.infos]
    data, n_dims = base.data, None
    if kind in ("flip_header", "flip_tensor_info"):
        raw = bytearray(base.raw)
        low = 4 if kind == "flip_header" else base.info_start
        for pos in rng.integers(low, base.data_start, size=rng.integers(1, 5)):
            raw[pos] = rng.integers(256)
        content = bytes(raw)
    elif kind == "truncate":
        end = base.data_start if rng.random() < 0.7 else len(base.raw)
        content = base.raw[:rng.integers(0, end)]
    else:
        if kind == "edit_key":
            i = rng.integers(len(kvs))
            action = rng.choice(["delete", "duplicate", "replace", "replace", "replace"])
            if action == "delete":
                del kvs[i]
            elif action == "duplicate":
                kvs.append(list(kvs[i]))
            else:
                kvs[i][1:] = BAD_VALUES[rng.integers(len(BAD_VALUES))]
        elif kind == "edit_vocab":
            arrays = [kv for kv in kvs if kv[0] in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                    "tokenizer.ggml.scores", "tokenizer.ggml.merges")]
            kv = arrays[rng.integers(len(arrays))]
            key = kv[0]
            values = list(kv[3])
            action = rng.choice(["element", "shorten", "retype"])
            if action == "shorten":
                kv[3] = values[:rng.integers(0, len(values))]
            elif action == "retype":
                kv[1:] = BAD_VALUES[rng.integers(len(BAD_VALUES))]
            else:
                j = rng.integers(len(values))
                palette = {"tokenizer.ggml.tokens": BAD_PIECES, "tokenizer.ggml.token_type": BAD_TOKEN_TYPES,
                           "tokenizer.ggml.scores": [float("nan"), float("inf"), -1e30],
                           "tokenizer.ggml.merges": ["a", "", " b", "a  b", "\x00 \x00"] + BAD_PIECES}[key]
                values[j] = palette[rng.integers(len(palette))]
                kv[3] = values
        elif kind == "edit_tensor":
            t = infos[rng.integers(len(infos))]
            action = rng.choice(["n_dims", "dim", "qtype", "offset"])
            if action == "n_dims":
                n_dims = {t[0]: int(rng.choice([0, 3, 5, 2**31]))}
            elif action == "dim":
                t[1][rng.integers(len(t[1]))] = int(rng.choice([0, 1, 31, 2**40, 2**63]))
            elif action == "qtype":
                t[2] = int(rng.choice([0, 1, 2, 3, 12, 14, 24, 26, 30, 99, 2**31]))
            else:
                t[3] = int(rng.choice([1, 32, 2**40])) + t[3]
        elif kind == "bpe":
            model = next(kv for kv in kvs if kv[0] == "tokenizer.ggml.model")
            model[3] = "gpt2"
            merges = rng.choice(["none", "missing tokens", "malformed"])
            if merges != "none":
                kvs.append(["tokenizer.ggml.merges", V.ARRAY, V.STRING,
                            ["zq zq", "\u2581 t"] if merges == "missing tokens" else ["x", ""]])
        else:  # garbage_weights: a whole tensor of 0xFF bytes (NaN in F16, -1 * NaN scales in Q8_0)
            name, dims, qtype, offset = infos[rng.integers(len(infos))]
            size = len(base.data) - offset if infos[-1][3] == offset else \
                min(i[3] for i in infos if i[3] > offset) - offset
            data = data[:offset] + b"\xff" * size + data[offset + size:]
        content = gguf_bytes(kvs, infos, data, n_dims)
    mode, temp = str(rng.choice(modes)), str(rng.choice([0, 0.8]))
    if rng.random() < 0.2:
        return Case(f"gguf:{kind}", ["perplexity", "{dir}/model.gguf", "-f", "{dir}/text.txt", "-c", "16", "--chunks",
                                     "2", "-t", "1", "--sparse", mode], {"model.gguf": content, "text.txt": TEXT})
    return Case(f"gguf:{kind}", ["run", "{dir}/model.gguf", "-n", "2", "-t", "1", "--temp", temp, "-p", "The LORD",
                                 "--sparse", mode], {"model.gguf": content})


def _json_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_paths(v, path + (i,))


def _predictor_case(rng: np.random.Generator) -> Case:
    config = json.loads((DEFAULT_PREDICTOR / "config.json").read_text())
    weights = (DEFAULT_PREDICTOR / "predictor.safetensors").read_bytes()
    kind = rng.choice(["config", "config", "safetensors_flip", "safetensors_truncate", "safetensors_dtype"])
    if kind == "config":
        paths = [p for p in _json_paths(config) if p]
        path = paths[rng.integers(len(paths))]
        parent = config
        for k in path[:-1]:
            parent = parent[k]
        if rng.random() < 0.2 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = BAD_JSON[rng.integers(len(BAD_JSON))]
    elif kind == "safetensors_flip":
        n = struct.unpack("<Q", weights[:8])[0]
        raw = bytearray(weights)
        for pos in rng.integers(0, 8 + n, size=rng.integers(1, 4)):
            raw[pos] = rng.integers(256)
        weights = bytes(raw)
    elif kind == "safetensors_truncate":
        weights = weights[:rng.integers(0, len(weights))]
    else:  # another dtype name of the same or another width, data unchanged
        n = struct.unpack("<Q", weights[:8])[0]
        header = json.loads(weights[8:8 + n])
        key = rng.choice(sorted(k for k in header if k != "__metadata__"))
        header[key]["dtype"] = str(rng.choice(["BF16", "F8_E4M3", "F8_E5M2", "I16", "F32", "U8"]))
        text = json.dumps(header).encode()
        weights = struct.pack("<Q", len(text)) + text + weights[8 + n:]
    files = {"pred/config.json": json.dumps(config).encode(), "pred/predictor.safetensors": weights}
    return Case(f"predictor:{kind}", ["run", str(DEFAULT_MODEL), "--predictor", "{dir}/pred", "-n", "2", "-t", "1"],
                files)


# option -> (valid values, invalid values); an option drawn takes an invalid value one time in three
MODEL_OPTIONS = {
    "-t": (["1", "2"], ["0", "3", "64", "-1", "x"]),
    "--ffn-act": (["relu", "fatrelu:0.1"], ["silu", "fatrelu:inf", "fatrelu:nan", "fatrelu:-1", "fatrelu:", "gelu"]),
    "--sparse": (["off", "exact", "predicted"], ["bogus"]),
    "--predictor": ([str(DEFAULT_PREDICTOR)], ["{dir}/none", "{dir}/text.txt", "{dir}"]),
    "--predictor-type": (["f16", "q8_0", "q4_0"], ["q2"]),
}
COMMAND_OPTIONS = {
    "run": {
        "-c": (["0", "8", "64", "200"], ["1", "2", "100000", "4294967296", "-5", "abc"]),
        "-n": (["-1", "0", "1", "3"], ["-2"]),
        "--temp": (["0", "0.7", "1e300"], ["-1", "nan", "inf"]),
        "--top-k": (["0", "1", "40", "1000000"], ["-3"]),
        "--top-p": (["0.5", "1"], ["0", "1.5", "nan"]),
        "--repeat-penalty": (["1", "1.5", "1e-300", "100"], ["0", "inf", "nan"]),
        "--seed": (["0", "7", "99999999999999999999999"], ["-1", "x"]),
        "-p": (["The LORD", "<s></s><unk>", "\x00", "a " * 3000, ""], ["\udcff\udcfe"]),
        "--chat-template": (["{dir}/ok.jinja"], ["{dir}/loop.jinja", "{dir}/broken.jinja", "{dir}/none",
                                                 "{dir}/binary.bin"]),
    },
    "perplexity": {
        "-c": (["8", "16", "64"], ["0", "1", "100000", "-5"]),
        "-f": (["{dir}/text.txt"], ["{dir}/none", "{dir}/binary.bin", "{dir}/empty.txt"]),
        "--chunks": (["-1", "1"], ["0", "-7"]),
    },
    "bench": {"-p": (["0", "4"], ["1000000000", "-1"]), "-n": (["0", "2"], ["-1"]), "-r": (["1"], ["0"])},
    "profile": {"--data": (["{dir}/text.txt"], ["{dir}/none", "{dir}/binary.bin", "{dir}/empty.txt"]),
                "--tokens": (["2", "64"], ["1", "-1", "x"]), "-c": (["0", "16"], ["1", "100000"]),
                "--plot": (["{dir}/plot.png"], ["{dir}/none/plot.png"]), "-o": (["{dir}/s.safetensors"], ["{dir}"])},
}
DEFAULTS = {"run": ["-n", "2"], "perplexity": ["-c", "16", "--chunks", "1", "-f", "{dir}/text.txt"],
            "bench": ["-p", "8", "-n", "2", "-r", "1"],
            "profile": ["--data", "{dir}/text.txt", "-o", "{dir}/s.safetensors", "--tokens", "64"]}
SPARSE_OPTIONS = ("--sparse", "--predictor", "--predictor-type")  # profile runs dense and has none
MODELS = ([str(DEFAULT_MODEL)] * 6, ["{dir}/none.gguf", "{dir}", "{dir}/text.txt", "{dir}/empty.txt"])
ARG_FILES = {
    "loop.jinja": b"{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "broken.jinja": b"{% for %}", "ok.jinja": b"{{ messages[0]['content'] }}", "binary.bin": bytes(range(256)) * 4,
    "text.txt": TEXT, "empty.txt": b"",
}


def _draw(rng: np.random.Generator, choices: tuple[list[str], list[str]]) -> str:
    values = choices[1] if rng.random() < 1 / 3 else choices[0]
    return str(values[rng.integers(len(values))])


def _args_case(rng: np.random.Generator) -> Case:
    command = str(rng.choice(["run"] * 4 + ["perplexity", "bench", "profile"]))
    argv = [command, _draw(rng, MODELS)]
    for name, choices in {**MODEL_OPTIONS, **COMMAND_OPTIONS[command]}.items():
        if rng.random() < 0.25 and not (command == "profile" and name in SPARSE_OPTIONS):
            argv += [name, _draw(rng, choices)]
    for i in range(0, len(DEFAULTS[command]), 2):
        if DEFAULTS[command][i] not in argv:
            argv += DEFAULTS[command][i:i + 2]
    argv += [flag for flag in ("--json", "--chat") if rng.random() < 0.2 and (flag == "--json" or command == "run")]
    return Case(f"args:{command}", argv, ARG_FILES)


@dataclass
class Outcome:
    kind: str  # ok, error, traceback, hang, warning
    detail: str = ""


def run_case(case: Case, workdir: Path, limit: float) -> Outcome:
    """Run one case in this process; a watchdog interrupts it (as Ctrl-C does) after limit seconds."""
    shutil.rmtree(workdir, ignore_errors=True)
    for name, content in case.files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_bytes(content)
    workdir.mkdir(exist_ok=True)
    argv = [a.replace("{dir}", str(workdir)) for a in case.argv]
    out, err = io.StringIO(), io.StringIO()
    fired = threading.Event()

    def expire():
        fired.set()
        _thread.interrupt_main()

    watchdog = threading.Timer(limit, expire)
    watchdog.start()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main(argv)
            except SystemExit as e:
                status = e.code
            finally:
                watchdog.cancel()
    except KeyboardInterrupt:  # the watchdog fired outside the CLI's own handler
        status = 130
    except BaseException as e:  # noqa: BLE001 - the finding itself
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome("traceback", f"{type(e).__name__}: {str(e)[:160]} at {Path(frame.filename).name}:"
                                    f"{frame.lineno} ({frame.name})")
    if fired.is_set():
        return Outcome("hang", f"still running after {limit:g} s")
    if "Warning: " in err.getvalue():  # a Python warning is noise around the one line a user should get
        return Outcome("warning", err.getvalue()[err.getvalue().index("Warning: ") - 40:][:200])
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    if status == 0:
        return Outcome("ok")
    if len(errors) == 1 and "Traceback" not in err.getvalue():
        return Outcome("error", errors[0][:160])
    return Outcome("traceback", f"exit status {status!r} with stderr ending {err.getvalue()[-300:]!r}")


def run(cases: int, seed: int, limit: float = 20.0, verbose: bool = False,
        model: Path = DEFAULT_MODEL) -> tuple[Counter, list[str]]:
    """Run `cases` cases drawn with `seed`, damaging `model` (a llama GGUF; the default model's
    predictor is damaged too); return the outcome counts and one line per finding."""
    rng = np.random.default_rng(seed)
    base = Base.read(model)
    modes = ["off", "exact"] if model == DEFAULT_MODEL else ["off"]  # another model may have no ReLU
    counts, findings = Counter(), []
    with tempfile.TemporaryDirectory(prefix="hybridinfer-fuzz-") as tmp:
        for i in range(cases):
            draw = rng.random()
            case = _gguf_case(rng, base, modes) if draw < 0.5 else _predictor_case(rng) if draw < 0.65 else _args_case(rng)
            outcome = run_case(case, Path(tmp) / "case", limit)
            counts[outcome.kind] += 1
            line = f"case {i} [{case.kind}] {outcome.kind}: {outcome.detail} argv={case.argv}"
            if outcome.kind in ("traceback", "hang", "warning"):
                findings.append(line)
            if verbose:
                print(line, file=sys.stderr)
    return counts, findings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=300, help="cases to run (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--limit", type=float, default=20.0, help="seconds before a case counts as a hang (default: 20)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file to damage (default: the default model)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case's outcome")
    args = p.parse_args(argv)
    counts, findings = run(args.cases, args.seed, args.limit, args.verbose, args.model)
    for line in findings:
        print(line)
    print(f"{args.cases} cases (seed {args.seed}): " + ", ".join(f"{counts[k]} {k}" for k in
                                                                 ("ok", "error", "traceback", "hang", "warning")))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
