"""The fold rules, in the order they are tried on each node. No registration by import."""

from bnfold.folding.rules.add_bn import AddBnRule
from bnfold.folding.rules.affine_matmul import AddMatMulRule, MulMatMulRule
from bnfold.folding.rules.bn_conv import BnConvRule
from bnfold.folding.rules.bn_gemm import BnGemmRule
from bnfold.folding.rules.bn_matmul import BnMatMulRule
from bnfold.folding.rules.concat_bn import ConcatBnRule
from bnfold.folding.rules.conv_bn import ConvBnRule
from bnfold.folding.rules.convtranspose_bn import ConvTransposeBnRule
from bnfold.folding.rules.gemm_bn import GemmBnRule
from bnfold.folding.rules.identity_bn import IdentityBnRule
from bnfold.folding.rules.lower_bn import LowerBnRule
from bnfold.folding.rules.matmul_bn import MatMulBnRule
from bnfold.folding.rules.matmul_mul import MatMulMulRule
from bnfold.folding.rules.matmul_reshape_bn import MatMulReshapeBnRule
from bnfold.folding.rules.merge_convs import MergeConvsRule
from bnfold.folding.rules.split_bn import SplitBnRule

# Folding into the producer comes first: it removes the BN without touching the consumer.
FOLD_RULES = (
    ConvBnRule(),
    ConvTransposeBnRule(),
    GemmBnRule(),
    MatMulBnRule(),
    MatMulReshapeBnRule(),
    MatMulMulRule(),
    ConcatBnRule(),
    SplitBnRule(),
    AddBnRule(),
    BnConvRule(),
    BnGemmRule(),
    BnMatMulRule(),  # 2-D input only: BN → MatMul (→ bias Add) becomes one Gemm
    AddMatMulRule(),  # a frozen BN's shift (tf2onnx: Mul → Add) into the Dense biases after it
    MulMatMulRule(),  # and then its scale into their B
    IdentityBnRule(),
    MergeConvsRule(),  # not a BN: the Convs the folds above leave summed, merged
)
LOWER_RULES = (LowerBnRule(),)

__all__ = ["FOLD_RULES", "LOWER_RULES"]
