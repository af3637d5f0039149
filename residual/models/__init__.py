"""The model zoo: every model is a composition of :class:`~residual.Residual` blocks."""

from residual.interop.torchvision import load_torchvision, to_torchvision_state_dict
from residual.models.attention import (
    AttentionBranch,
    FeedForward,
    SelfAttention,
    ValueResidualAttention,
)
from residual.models.cifar import CifarResNet, cifar_resnet
from residual.models.mlp import MLPMixer, ResidualMLP, mlp_block
from residual.models.recurrent import ResidualLSTM
from residual.models.resnet import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)
from residual.models.small import (
    HyperPatchTransformer,
    LSTMLanguageModel,
    PatchTransformer,
    RowLSTM,
)
from residual.models.transformer import (
    CausalTransformerLM,
    TransformerEncoderLayer,
    ValueResidualGPTBlock,
    gpt_block,
)

__all__ = [
    "AttentionBranch",
    "CausalTransformerLM",
    "CifarResNet",
    "FeedForward",
    "HyperPatchTransformer",
    "LSTMLanguageModel",
    "MLPMixer",
    "PatchTransformer",
    "ResNet",
    "ResidualLSTM",
    "ResidualMLP",
    "RowLSTM",
    "SelfAttention",
    "TransformerEncoderLayer",
    "ValueResidualAttention",
    "ValueResidualGPTBlock",
    "cifar_resnet",
    "gpt_block",
    "load_torchvision",
    "mlp_block",
    "resnet101",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "to_torchvision_state_dict",
    "wide_resnet50_2",
]
