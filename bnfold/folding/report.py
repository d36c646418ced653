"""What a fold did: each BatchNormalization folded (into what) or kept (and why), and counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

FOLDED = "folded"
LOWERED = "lowered"
KEPT = "kept"
MERGE_RULE = "merge-convs"  # an Add of two Convs merged into one: no BN, no frozen BN


@dataclass
class FoldEntry:
    node: str  # label of the BN (or Mul/Add) node
    op_type: str
    status: str  # folded | lowered | kept
    graph: str = "main"  # "main" or a subgraph path such as "If_0/then_branch"
    into: str | None = None  # the node it folded into
    rule: str | None = None
    reasons: list[str] = field(default_factory=list)  # why it was kept
    output: str | None = None  # the tensor it produced (after a fold, the target produces it)


@dataclass
class FoldReport:
    entries: list[FoldEntry] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    verification: dict | None = None  # VerifyResult.to_dict() when verified
    notes: list[str] = field(default_factory=list)  # what the fold decided beyond each BN
    frozen_inputs: list[str] = field(default_factory=list)
    # Main-graph tensors that keep their names but, by design, not their values (a Conv that
    # took a BN's scale as one input of a sum or a concatenation): no fold site to compare.
    altered_values: set[str] = field(default_factory=set)

    @property
    def changed(self) -> bool:
        """Whether the fold edited the model at all (else it is written back unchanged)."""
        return bool(self.folded or self.lowered or self.frozen_inputs)

    @property
    def folded(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.status == FOLDED]

    @property
    def kept(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.status == KEPT]

    @property
    def lowered(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.status == LOWERED]

    @property
    def folded_count(self) -> int:
        """BatchNormalization nodes folded away (Mul/Add affine folds are listed, not counted)."""
        return sum(1 for e in self.folded if e.op_type == "BatchNormalization")

    @property
    def kept_count(self) -> int:
        """BatchNormalization nodes kept. Also in `kept`, not counted here: each Mul/Add of a
        per-channel constant that a rule matched and refused (a frozen BN that stays)."""
        return sum(1 for e in self.kept if e.op_type == "BatchNormalization")

    @property
    def merged_count(self) -> int:
        """Adds of two Convs of one input merged into one Conv (rules.merge_convs)."""
        return sum(1 for e in self.folded if e.rule == MERGE_RULE)

    @property
    def batchnorm_count(self) -> int:
        return sum(1 for e in self.entries if e.op_type == "BatchNormalization")

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["altered_values"]
        data["summary"] = {
            "batchnorm": self.batchnorm_count,
            "folded": self.folded_count,
            "lowered": len(self.lowered),
            "kept": self.kept_count,
            "mul_add_folded": len(self.folded) - self.folded_count - self.merged_count,
            "convs_merged": self.merged_count,
            "mul_add_kept": len(self.kept) - self.kept_count,
        }
        return data
