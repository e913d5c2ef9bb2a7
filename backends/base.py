"""What every backend's `lower` returns: the files it wrote and the kernel chosen for each MoE layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class KernelChoice:
    layer: str                       # MoESpec.name (or the fx node name)
    kernel: str                      # namespaced: "torch.grouped_gemm", "ort.moe_fused", "tvm.gather"
    reason: str = ""                 # why it was chosen (cost, autotune, only candidate)
    rejected: dict[str, str] = field(default_factory=dict)   # kernel -> why not

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Lowered:
    files: list[str]                                 # relative to the artifact dir
    kernels: list[KernelChoice] = field(default_factory=list)
    notes: dict = field(default_factory=dict)        # backend-specific, JSON-serializable

    def to_dict(self) -> dict:
        return {"files": self.files, "kernels": [k.to_dict() for k in self.kernels], "notes": self.notes}
