"""`carvq footprint`: what a model costs on this device, in file bytes and resident memory.

File bytes are split into categories that add up exactly to the file size. Resident memory
is measured in a child process (so each measurement starts clean) that loads the model
through the runtime and generates N tokens, reading /proc/self/status: VmRSS after load and
VmHWM (peak) at the end, once with mmap and once without (on a device without swap, the
second is what must fit). Linux only (x86-64 and aarch64), no root needed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from carvq import format as fmt
from carvq import gguf_io as gio
from carvq.errors import CarvqError

SCHEMA_VERSION = 1
CATEGORIES = ("embedding", "output_head", "blocks", "other_tensors", "metadata_and_padding")


@dataclass
class Category:
    bytes: int = 0
    elements: int = 0

    @property
    def bpw(self) -> float | None:
        return 8.0 * self.bytes / self.elements if self.elements else None


@dataclass
class Footprint:
    model: str
    file_bytes: int
    categories: dict[str, Category]
    tied_head: bool
    rss: dict[str, dict[str, int]] = field(default_factory=dict)  # mode -> {"after_load", "peak"} bytes
    tokens: int = 0

    def as_dict(self) -> dict:
        cats = {k: {**asdict(v), "bpw": v.bpw} for k, v in self.categories.items()}
        return {"model": self.model, "file_bytes": self.file_bytes, "tied_head": self.tied_head,
                "categories": cats, "rss": self.rss, "tokens": self.tokens}


def _category(name: str) -> str:
    if name == gio.EMBD or name.startswith(fmt.PREFIX):
        return "embedding"
    if name == gio.HEAD or name.startswith(fmt.SCREEN_PREFIX):
        return "output_head"  # with what screens it (the screen index and correction, output.carvq.*)
    if name.startswith("blk."):
        return "blocks"
    return "other_tensors"


def file_categories(path) -> Footprint:
    reader = gio.open_gguf(path)
    cats = {name: Category() for name in CATEGORIES}
    for t in reader.tensors:
        c = cats[_category(t.name)]
        c.bytes += int(t.n_bytes)
        c.elements += int(t.n_elements)
    if fmt.is_carvq(reader):  # bpw per embedding weight (V x n), not per stored code byte
        layout = fmt.read_layout(reader)
        cats["embedding"].elements = layout.n_vocab * layout.n_embd
    size = Path(path).stat().st_size
    cats["metadata_and_padding"].bytes = size - sum(c.bytes for c in cats.values())
    tied = gio.tensor_by_name(reader, gio.HEAD) is None
    return Footprint(str(path), size, cats, tied)


_CHILD = r"""
import json, sys
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out
from carvq.runtime.model import Model
path, use_mmap, tokens, head = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
model = Model(path, n_ctx=max(256, tokens + 64), use_mmap=use_mmap, head=head)
after_load = status()["VmRSS"]
if tokens:
    for _ in model.generate("The history of the city begins", max_tokens=tokens, temperature=0):
        pass
print(json.dumps({"after_load": after_load, "peak": status()["VmHWM"]}))
"""


def measure_rss(path, tokens: int, head: str = "auto") -> dict[str, dict[str, int]]:
    if not Path("/proc/self/status").exists():
        raise CarvqError("resident memory is read from /proc: Linux only")
    out = {}
    for mode, flag in (("mmap", "1"), ("no_mmap", "0")):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(Path(path).resolve()), flag, str(tokens), head],
                              capture_output=True, text=True, errors="replace")
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise CarvqError(f"measuring {path} failed: {lines[-1] if lines else proc.returncode}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def footprint(path, tokens: int = 16, measure: bool = True, head: str = "auto") -> Footprint:
    fp = file_categories(path)
    fp.tokens = tokens
    if measure:
        fp.rss = measure_rss(path, tokens, head)
    return fp


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:9.2f}"


def table(models: list[Footprint]) -> str:
    """Categories (MiB and bpw) and RSS, one column per model, and savings against the first."""
    head = f"{'':<24}" + "".join(f"{Path(m.model).name[:30]:>32}" for m in models)
    lines = [head]
    for cat in CATEGORIES:
        cells = []
        for m in models:
            c = m.categories[cat]
            bpw = f" ({c.bpw:.3f} bpw)" if c.bpw is not None else ""
            cells.append(f"{_mib(c.bytes).strip() + ' MiB' + bpw:>32}")
        lines.append(f"{cat:<24}" + "".join(cells))
    lines.append(f"{'file':<24}" + "".join(f"{_mib(m.file_bytes).strip() + ' MiB':>32}" for m in models))
    for mode in ("mmap", "no_mmap"):
        for key in ("after_load", "peak"):
            if all(mode in m.rss for m in models):
                lines.append(f"{'RSS ' + mode + ' ' + key:<24}" +
                             "".join(f"{_mib(m.rss[mode][key]).strip() + ' MiB':>32}" for m in models))
    if len(models) == 2:
        base, new = models[1], models[0]
        lines.append("")
        lines.append(f"savings of {Path(new.model).name} against {Path(base.model).name}:")
        pairs = [("file", base.file_bytes, new.file_bytes)]
        pairs += [(f"RSS {mode} peak", base.rss[mode]["peak"], new.rss[mode]["peak"])
                  for mode in ("mmap", "no_mmap") if mode in base.rss and mode in new.rss]
        for label, b, n in pairs:
            lines.append(f"  {label:<22}{(b - n) / 2**20:+10.2f} MiB  ({100 * (b - n) / b:+.1f} %)")
    for m in models:
        if m.tied_head:
            lines.append(f"note: {Path(m.model).name} ties its output head to the embedding (one tensor serves both)")
    return "\n".join(lines)


def to_json(models: list[Footprint]) -> str:
    doc = {"schema": SCHEMA_VERSION, "model": models[0].as_dict()}
    if len(models) == 2:
        doc["baseline"] = models[1].as_dict()
    return json.dumps(doc, indent=2)


def plot(models: list[Footprint], out: Path) -> None:
    """Stacked bars of file bytes by category, one bar per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CarvqError("--plot needs matplotlib (pip install 'carvq[plot]')") from None
    fig, ax = plt.subplots(figsize=(3 + 2 * len(models), 4.5))
    names = [Path(m.model).name for m in models]
    bottom = [0.0] * len(models)
    for cat in CATEGORIES:
        values = [m.categories[cat].bytes / 2**20 for m in models]
        ax.bar(names, values, bottom=bottom, label=cat.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("MiB")
    ax.set_title("file bytes by category")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
