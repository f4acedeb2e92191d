"""`--dry-run`: the LoKr of a config on the real SDXL architecture (meta device, no weights):
modules, parameters and file size per module group, against the recipe's 800 MB budget."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainers.lokr.sdxl.model import sdxl_on_meta
from trainers.lokr.network.lokr import SAVE_DTYPES, create_lokr, lokr_targets

BUDGET_BYTES = 800 * 1000 ** 2  # recipe §3: the LoKr file is under 800 MB
HEADER_BYTES_PER_TENSOR = 128   # safetensors JSON header entry (name, dtype, shape, offsets), rounded up


@dataclass
class Group:
    """One module group: a block class inside one of the three networks."""

    network: str          # unet | te1 | te2
    block: str            # a [lokr.factors] group: Attention, FeedForward, ..., CLIPMLP
    factor: int
    modules: int = 0      # LoKr modules (one per wrapped Linear / Conv / norm)
    params: int = 0       # trainable LoKr parameters
    tensors: int = 0      # tensors in the file (alpha, lokr_w1, lokr_w2; w_norm, b_norm)
    values: int = 0       # numbers in the file: the parameters and each module's alpha


@dataclass
class DryRunReport:
    """Everything `--dry-run` prints; `file_bytes` is the size of the saved LoKr file."""

    save_dtype: str
    groups: list[Group] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def file_bytes(self) -> int:
        return sum(self.group_bytes(g) for g in self.groups)

    def group_bytes(self, g: Group) -> int:
        return g.values * SAVE_DTYPES[self.save_dtype].itemsize + g.tensors * HEADER_BYTES_PER_TENSOR

    def table(self) -> str:
        """The report as text lines: one per group, then the total and the budget verdict."""
        lines = [f"LoKr on SDXL 1.0 base (meta device), full_matrix, saved as {self.save_dtype}",
                 f"{'group':<24}{'factor':>7}{'modules':>9}{'parameters':>15}{'file MB':>10}"]
        for g in self.groups:
            lines.append(f"{g.network + ' ' + g.block:<24}{g.factor:>7}{g.modules:>9}{g.params:>15,}"
                         f"{self.group_bytes(g) / 1e6:>10.1f}")
        mb = self.file_bytes / 1e6
        lines.append(f"{'total':<24}{'':>7}{sum(g.modules for g in self.groups):>9}{self.params:>15,}{mb:>10.1f}")
        verdict = "within" if self.file_bytes < BUDGET_BYTES else "OVER"
        lines.append(f"{verdict} the recipe's {BUDGET_BYTES / 1e6:.0f} MB budget")
        return "\n".join(lines)


def dry_run(cfg: dict, sdxl=None) -> DryRunReport:
    """Build the config's LoKr on SDXL (default: the real architecture on the meta device)
    and count it per module group.

    Counted per LoKr module: under the meta device the network's own `parameters()` is not
    reliable (pitfalls.md)."""
    sdxl = sdxl or sdxl_on_meta()
    lokr = cfg["lokr"]
    with_text = cfg.get("train", {}).get("train_text_encoders", True)
    with torch.device("meta"):
        network = create_lokr(sdxl, lokr, text_encoders=with_text)
    targets = lokr_targets(sdxl, lokr, text_encoders=with_text)
    groups: dict[tuple[str, str], Group] = {}
    for net_name, group in targets.values():  # rows in network order
        groups.setdefault((net_name, group), Group(net_name, group, lokr["factors"][group]))
    for lora in network.loras:
        g = groups[targets[lora.lora_name]]
        state = lora.state_dict()
        g.modules += 1
        g.params += sum(v.numel() for k, v in state.items() if k != "alpha")
        g.tensors += len(state)
        g.values += sum(v.numel() for v in state.values())
    return DryRunReport(lokr.get("save_dtype", "fp16"), list(groups.values()))


# The training options beyond the recipe (issue 20): each defaults to what the epsilon recipe did.
OPTION_KEYS = ("model.prediction_type", "model.zero_terminal_snr", "optimizer.name", "optimizer.schedule",
               "optimizer.cycles", "data.caption_dropout", "data.bucket_no_upscale", "ema.decay",
               "validation.samples", "train.log_with")


def option_lines(cfg: dict) -> list[str]:
    """One line per option of ``OPTION_KEYS``: its value, and whether it is the recipe's."""
    from trainers.lokr.config import flatten, load_config

    recipe, flat = flatten(load_config("epsilon")), flatten(cfg)
    lines = ["training options (the recipe's unless marked):"]
    for key in OPTION_KEYS:
        mark = "" if flat[key] == recipe[key] else f"   <- not the recipe's {recipe[key]!r}"
        lines.append(f"  {key:<26}{flat[key]!r}{mark}")
    return lines


def main(cfg: dict) -> int:
    """`python -m trainers.lokr --dry-run [--config NAME]`: print the report and the training
    options; 0 when within budget."""
    report = dry_run(cfg)
    print(report.table())
    print("\n".join(option_lines(cfg)))
    return 0 if report.file_bytes < BUDGET_BYTES else 1
