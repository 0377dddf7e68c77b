"""Networks: the paper's GroupNorm ResNet9 (2D), its ACS-3D twin, its fast GroupNorm and Mish layers, and the DP
compatibility check."""

from dpmedtf.models.acs import ACSConv, acs_split
from dpmedtf.models.layers import GroupNorm, Mish, group_norm, mish
from dpmedtf.models.resnet9 import PAPER_WIDTHS, build_resnet9, convert_to_acs, describe_resnet9
from dpmedtf.models.serialization import load_model, save_model
from dpmedtf.models.validate import CLIPPABLE_LAYERS, DpIncompatibleModelError, dp_problems, validate_for_dp

__all__ = ["ACSConv", "acs_split", "GroupNorm", "Mish", "group_norm", "mish", "PAPER_WIDTHS", "build_resnet9",
           "convert_to_acs", "describe_resnet9", "load_model", "save_model", "CLIPPABLE_LAYERS",
           "DpIncompatibleModelError", "dp_problems", "validate_for_dp"]
