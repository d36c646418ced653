"""The fold rules, in the order they are tried on each node. No registration by import."""

from bnfold.fold.rules.bn_conv import BnConvRule
from bnfold.fold.rules.bn_gemm import BnGemmRule
from bnfold.fold.rules.conv_bn import ConvBnRule
from bnfold.fold.rules.convtranspose_bn import ConvTransposeBnRule
from bnfold.fold.rules.gemm_bn import GemmBnRule
from bnfold.fold.rules.lower_bn import LowerBnRule
from bnfold.fold.rules.matmul_bn import MatMulBnRule

# Folding into the producer comes first: it removes the BN without touching the consumer.
FOLD_RULES = (
    ConvBnRule(),
    ConvTransposeBnRule(),
    GemmBnRule(),
    MatMulBnRule(),
    BnConvRule(),
    BnGemmRule(),
)
LOWER_RULES = (LowerBnRule(),)

__all__ = ["FOLD_RULES", "LOWER_RULES"]
