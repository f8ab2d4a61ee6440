"""A corpus of hostile CARVQ files (issue 12, item 9): one file per way a file can be wrong,
each made from a good CARVQ-GGUF by changing one thing. Every reader must refuse each with one
clear line (tests/test_hostile_files.py): the patched llama.cpp loader, the Python reader,
`carvq inspect` and `carvq eval`.

    python tests/hostile_corpus.py GOOD.carvq.gguf OUTDIR   # writes OUTDIR/*.gguf + manifest.json
    python tests/hostile_corpus.py --table OUTDIR           # what each reader says (docs/RESULTS.md)

The good file needs an adaptor and hot rows (the test suite's tiny llama conversion has both).
manifest.json maps each file to a fragment that every reader's message must contain ("a|b": one
of them).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from carvq import format as fmt
from carvq import gguf_io as gio
from carvq.format import Key, ScreenKey, Tensor

KEEP = object()


def rewrite(src: Path, dst: Path, *, keys: dict | None = None, tensors: dict | None = None,
            arch: str | None = None) -> None:
    """A copy of `src` with metadata `keys` replaced (name -> (GGUF type name, value), or None to
    drop it) and `tensors` replaced (name -> array, or None to drop it)."""
    import gguf

    keys, tensors = keys or {}, tensors or {}
    reader = gio.open_gguf(src)
    old_arch = gio.field_value(reader, "general.architecture")
    writer = gguf.GGUFWriter(None, arch or old_arch)
    gio.copy_fields(reader, writer, skip=set(keys))
    if arch:  # the same model under another architecture's name: its keys renamed too
        kv = writer.kv_data[0]
        for name in [k for k in kv if k.startswith(old_arch + ".")]:
            kv[arch + name[len(old_arch):]] = kv.pop(name)
    for name, spec in keys.items():
        if spec is not None and spec[0] == "ARRAY_UINT32":
            writer.add_key_value(name, list(spec[1]), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
        elif spec is not None:
            kind, value = spec
            getattr(writer, {"UINT32": "add_uint32", "STRING": "add_string", "FLOAT32": "add_float32",
                             "BOOL": "add_bool", "INT32": "add_int32"}[kind])(name, value)
    for t in reader.tensors:
        if t.name not in tensors:
            gio.add_source_tensor(writer, t)
        elif tensors[t.name] is not None:
            writer.add_tensor(t.name, tensors[t.name])
    have = {t.name for t in reader.tensors}
    for name, arr in tensors.items():  # tensors the good file does not have, added at the end
        if name not in have and arr is not None:
            writer.add_tensor(name, arr)
    gio.write_gguf(writer, dst, progress=False)


def _array(reader, name: str) -> np.ndarray:
    t = gio.tensor_by_name(reader, name)
    return np.asarray(t.data).reshape(tuple(int(x) for x in reversed(t.shape.tolist()))).copy()


def make(good: Path, out: Path) -> dict[str, str]:
    """Write the corpus; {file name: expected message fragment}."""
    out.mkdir(parents=True, exist_ok=True)
    reader = gio.open_gguf(good)
    lo = fmt.read_layout(reader)
    assert lo.adaptor_rank and lo.hot_rows, "the good file needs an adaptor and hot rows"
    codes, codebooks = _array(reader, Tensor.CODES), _array(reader, Tensor.CODEBOOKS)
    hot_ids = _array(reader, Tensor.HOT_IDS)
    hot_map = fmt.pack_hot_map(lo, hot_ids).view(np.int8)
    hot_map_extra = hot_map.copy()
    free = int(np.setdiff1d(np.arange(lo.n_vocab), hot_ids)[0])  # a token that is not a hot row
    hot_map_extra[free >> 3] |= np.int8(np.uint8(1 << (free & 7)).view(np.int8))
    cases: dict[str, tuple[dict, str]] = {
        # metadata: presence, type, range
        "version-string": (dict(keys={Key.VERSION: ("STRING", "2")}), Key.VERSION),
        "version-99": (dict(keys={Key.VERSION: ("UINT32", 99)}), "version"),
        "group-size-missing": (dict(keys={Key.GROUP_SIZE: None}), Key.GROUP_SIZE),
        "group-size-int32": (dict(keys={Key.GROUP_SIZE: ("INT32", lo.group_size)}), Key.GROUP_SIZE),
        "levels-zero": (dict(keys={Key.LEVELS: ("UINT32", 0)}), "levels"),
        "levels-huge": (dict(keys={Key.LEVELS: ("UINT32", 4_000_000_000)}), "levels"),
        "codebook-size-17": (dict(keys={Key.CODEBOOK_SIZE: ("UINT32", 17)}), "codebook"),
        "adaptor-rank-float": (dict(keys={Key.ADAPTOR_RANK: ("FLOAT32", 4.0)}), Key.ADAPTOR_RANK),
        "activation-number": (dict(keys={Key.ACTIVATION: ("UINT32", 1)}), Key.ACTIVATION),
        "activation-unknown": (dict(keys={Key.ACTIVATION: ("STRING", "swish")}), "activation"),
        "hot-rows-missing-v2": (dict(keys={Key.HOT_ROWS: None}), Key.HOT_ROWS),
        "hot-rows-beyond-vocab": (dict(keys={Key.HOT_ROWS: ("UINT32", lo.n_vocab + 1)}), "hot"),
        # tensors: presence, type, shape
        "codes-missing": (dict(tensors={Tensor.CODES: None}), Tensor.CODES),
        "codes-f32": (dict(tensors={Tensor.CODES: codes.astype(np.float32)}), Tensor.CODES),
        "codes-rows-short": (dict(tensors={Tensor.CODES: codes[:-3]}), Tensor.CODES),
        "codebooks-missing": (dict(tensors={Tensor.CODEBOOKS: None}), Tensor.CODEBOOKS),
        "codebooks-i32": (dict(tensors={Tensor.CODEBOOKS: codebooks.astype(np.int32)}), Tensor.CODEBOOKS),
        "codebooks-3d": (dict(tensors={Tensor.CODEBOOKS: codebooks[0]}), Tensor.CODEBOOKS),
        "sigma0-missing": (dict(tensors={Tensor.SIGMA0: None}), Tensor.SIGMA0),
        "up-bias-wrong-shape": (dict(tensors={Tensor.UP_B: np.zeros(lo.adaptor_hidden + 1, np.float32)}), Tensor.UP_B),
        "adaptor-without-rank": (dict(keys={Key.ADAPTOR_RANK: ("UINT32", 0), Key.ADAPTOR_HIDDEN: ("UINT32", 0)}),
                                 Tensor.SIGMA0),
        "hot-codes-missing": (dict(tensors={Tensor.HOT_CODES: None}), Tensor.HOT_CODES),
        # data
        "codebooks-nan": (dict(tensors={Tensor.CODEBOOKS: np.where(np.arange(codebooks.size).reshape(codebooks.shape) == 5,
                                                                   np.float32(np.nan), codebooks)}), "non-finite"),
        "codebooks-inf": (dict(tensors={Tensor.CODEBOOKS: np.full_like(codebooks, np.inf)}), "non-finite"),
        "codes-beyond-k": (dict(keys={Key.CODEBOOK_SIZE: ("UINT32", 8)},
                                tensors={Tensor.CODEBOOKS: np.ascontiguousarray(codebooks[:, :, :8]),
                                         Tensor.HOT_CODEBOOKS: np.ascontiguousarray(
                                             _array(reader, Tensor.HOT_CODEBOOKS)[:, :, :8]),
                                         Tensor.CODES: np.full_like(codes, -1)}), "outside 0..7"),
        "hot-ids-unsorted": (dict(tensors={Tensor.HOT_IDS: hot_ids[[1, 0, *range(2, len(hot_ids))]]}), "hot"),
        "hot-ids-duplicate": (dict(tensors={Tensor.HOT_IDS: np.concatenate([hot_ids[:1], hot_ids[:-1]])}), "hot"),
        "hot-ids-negative": (dict(tensors={Tensor.HOT_IDS: np.concatenate([[-1], hot_ids[1:]]).astype(np.int32)}),
                             "hot"),
        # hot tiers (version 4): the good file's hot rows split in two tiers, wrongly
        "hot-tiers-in-v3": (dict(keys={Key.VERSION: ("UINT32", 3), Key.HOT_TIERS: ("ARRAY_UINT32", [lo.hot_rows - 1, 1])}),
                            "format_version 4"),
        "hot-tiers-not-array": (dict(keys={Key.VERSION: ("UINT32", 4), Key.HOT_TIERS: ("UINT32", lo.hot_rows)}),
                                "not an array"),
        "hot-tiers-sum-wrong": (dict(keys={Key.VERSION: ("UINT32", 4),
                                           Key.HOT_TIERS: ("ARRAY_UINT32", [lo.hot_rows, 1])}), "hot_tiers|hot tiers"),
        "hot-tiers-empty-tier": (dict(keys={Key.VERSION: ("UINT32", 4),
                                            Key.HOT_TIERS: ("ARRAY_UINT32", [lo.hot_rows, 0])}), "hot_tiers|hot tiers"),
        "hot-tiers-nine": (dict(keys={Key.VERSION: ("UINT32", 4),
                                      Key.HOT_TIERS: ("ARRAY_UINT32", [1] * 8 + [lo.hot_rows - 8])}), "hot_tiers|hot tiers"),
        "hot-tiers-codebooks-of-one": (dict(keys={Key.VERSION: ("UINT32", 4),
                                                  Key.HOT_TIERS: ("ARRAY_UINT32", [lo.hot_rows - 1, 1])}),
                                       Tensor.HOT_CODEBOOKS),
        # the hot rows' ids as a hot map (version 7) instead of hot_ids
        "hot-map-in-v6": (dict(keys={Key.VERSION: ("UINT32", 6), Key.HOT_MAP: ("BOOL", True)},
                               tensors={Tensor.HOT_IDS: None, Tensor.HOT_MAP: hot_map}), "format_version 7"),
        "hot-map-row-too-many": (dict(keys={Key.VERSION: ("UINT32", 7), Key.HOT_MAP: ("BOOL", True)},
                                      tensors={Tensor.HOT_IDS: None, Tensor.HOT_MAP: hot_map_extra}), Tensor.HOT_MAP),
        "hot-map-short": (dict(keys={Key.VERSION: ("UINT32", 7), Key.HOT_MAP: ("BOOL", True)},
                               tensors={Tensor.HOT_IDS: None, Tensor.HOT_MAP: hot_map[:-1]}), Tensor.HOT_MAP),
        "hot-map-and-hot-ids": (dict(keys={Key.VERSION: ("UINT32", 7), Key.HOT_MAP: ("BOOL", True)},
                                     tensors={Tensor.HOT_MAP: hot_map}), "hot_ids present"),
        "hot-map-without-key": (dict(keys={Key.VERSION: ("UINT32", 7)}, tensors={Tensor.HOT_MAP: hot_map}),
                                "hot_map present"),
        "hot-map-key-a-string": (dict(keys={Key.VERSION: ("UINT32", 7), Key.HOT_MAP: ("STRING", "yes")},
                                      tensors={Tensor.HOT_IDS: None, Tensor.HOT_MAP: hot_map}), Key.HOT_MAP),
        # the model around it
        "architecture-mistral3": (dict(arch="mistral3"), "architecture"),
    }
    if reader.get_field(ScreenKey.LEVELS) is not None:  # the output head's screen index (version 3)
        s_codes, proj = _array(reader, fmt.screen_name(Tensor.CODES)), _array(reader, fmt.SCREEN_PROJECTION)
        cases.update({
            "screen-index-in-v2": (dict(keys={Key.VERSION: ("UINT32", 2)}), "format_version 3"),
            "screen-tensors-without-key": (dict(keys={ScreenKey.LEVELS: None}), ScreenKey.LEVELS),
            "screen-codes-rows-short": (dict(tensors={fmt.screen_name(Tensor.CODES): s_codes[:-3]}),
                                        fmt.screen_name(Tensor.CODES)),
            "screen-projection-missing": (dict(tensors={fmt.SCREEN_PROJECTION: None}), fmt.SCREEN_PROJECTION),
            "screen-projection-nan": (dict(tensors={fmt.SCREEN_PROJECTION: np.where(np.eye(len(proj)) > 0, np.float32(np.nan),
                                                                                    proj).astype(np.float32)}),
                                      "non-finite"),
        })
        if gio.tensor_by_name(reader, fmt.screen_name(Tensor.HOT_IDS)) is not None:
            s_ids = _array(reader, fmt.screen_name(Tensor.HOT_IDS))
            cases["screen-hot-ids-unsorted"] = (dict(tensors={fmt.screen_name(Tensor.HOT_IDS): s_ids[[1, 0, *range(2, len(s_ids))]]}),
                                                "hot")
    if reader.get_field(fmt.FIX_RANK) is not None:  # the screen correction (version 5)
        fix, dirs = _array(reader, fmt.SCREEN_FIX), _array(reader, fmt.SCREEN_FIX_DIRS)
        cases.update({
            "screen-fix-in-v4": (dict(keys={Key.VERSION: ("UINT32", 4)}), "format_version 5"),
            "screen-fix-tensors-without-key": (dict(keys={fmt.FIX_RANK: None}), fmt.FIX_RANK),
            "screen-fix-rank-9": (dict(keys={fmt.FIX_RANK: ("UINT32", 9)}), fmt.FIX_RANK),
            "screen-fix-rows-short": (dict(tensors={fmt.SCREEN_FIX: np.ascontiguousarray(fix.reshape(-1)[:-3])}),
                                      fmt.SCREEN_FIX),
            "screen-fix-dirs-nan": (dict(tensors={fmt.SCREEN_FIX_DIRS: np.full_like(dirs, np.nan)}), "non-finite"),
            "screen-fix-without-screen": (dict(keys={Key.HEAD_COPY: ("BOOL", False)}), "corrects a screen"),
        })
    manifest = {}
    for name, (change, fragment) in cases.items():
        path = out / f"{name}.gguf"
        rewrite(good, path, **change)
        manifest[path.name] = fragment
    size = good.stat().st_size
    for name, cut in (("truncated-half", size // 2), ("truncated-header", 64), ("truncated-last-byte", size - 1)):
        path = out / f"{name}.gguf"
        path.write_bytes(good.read_bytes()[:cut])
        manifest[path.name] = "truncated|file size|file bounds|GGUF"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest




def table(corpus_dir: Path) -> str:
    """A markdown table of what each reader says about each file of a corpus made by make()
    (docs/RESULTS.md): the Python reader and the patched llama.cpp loader (through carvq generate)."""
    import subprocess

    from carvq.errors import CarvqError

    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    rows = ["| file | Python reader (inspect, eval) | llama.cpp loader (carvq generate) |", "|---|---|---|"]
    for name in manifest:
        path = corpus_dir / name
        try:
            fmt.read_tensors(gio.open_gguf(path))
            py = "(accepted)"
        except CarvqError as exc:
            py = str(exc).replace(str(path), "FILE")
        proc = subprocess.run([sys.executable, "-m", "carvq.cli", "generate", str(path), "-p", "the", "-n", "1"],
                              capture_output=True, text=True, errors="replace", timeout=120)
        c = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        c = c.replace(str(path), "FILE").replace("carvq: error: ", "")
        rows.append(f"| {name.removesuffix('.gguf')} | {py} | {c} |".replace("\n", " "))
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(Path(sys.argv[2])))
    elif len(sys.argv) == 3:
        for name, fragment in make(Path(sys.argv[1]), Path(sys.argv[2])).items():
            print(f"{name}: {fragment}")
    else:
        sys.exit(__doc__)
