"""The only place that touches torchvision's private API.

cellseg builds on three things torchvision does not promise to keep:
  backbone_utils._resnet_fpn_extractor  ResNet + FPN with our own norm layer (v2 puts BatchNorm in
                                        the FPN, which the public resnet_fpn_backbone cannot)
  RegionProposalNetwork._pre_nms_top_n  the test-time proposal budgets, a {"training", "testing"}
  / _post_nms_top_n                     dict with no public setter (budgets grow with image area)
  poolers._setup_scales                 the pooler's own level setup, reused by cellseg.roi_align
`check()` lists what is missing in the installed torchvision, so a torchvision upgrade that
breaks one of them fails one test with the version and the name, not deep inside a model."""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torchvision
from torch import Tensor, nn

from cellseg.errors import BackendUnavailableError

# (module, attribute) of every private function used below.
PRIVATE_FUNCTIONS = (
    ("torchvision.models.detection.backbone_utils", "_resnet_fpn_extractor"),
    ("torchvision.ops.poolers", "_setup_scales"),
)
# Private instance attributes of RegionProposalNetwork: dicts with "training" and "testing" keys.
RPN_BUDGET_ATTRS = ("_pre_nms_top_n", "_post_nms_top_n")


def _missing(what: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"torchvision {torchvision.__version__} lacks {what}, which cellseg "
                                   f"needs (see cellseg/tv_compat.py; install a torchvision it supports)")


def _private_function(module: str, name: str) -> Callable[..., Any]:
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise _missing(f"{module}.{name}")
    return fn


def _tiny_rpn() -> nn.Module:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    budgets = {"training": 2, "testing": 1}
    return RegionProposalNetwork(AnchorGenerator(((8,),), ((1.0,),)), RPNHead(4, 1), 0.7, 0.3, 4, 0.5,
                                 dict(budgets), dict(budgets), 0.7)


def check() -> list[str]:
    """What cellseg needs from torchvision's private API and this torchvision lacks (empty = all
    there), each as 'torchvision VERSION lacks NAME'."""
    problems = []
    for module, name in PRIVATE_FUNCTIONS:
        try:
            _private_function(module, name)
        except (BackendUnavailableError, ImportError):
            problems.append(f"torchvision {torchvision.__version__} lacks {module}.{name}")
    rpn = _tiny_rpn()
    for attr in RPN_BUDGET_ATTRS:
        value = getattr(rpn, attr, None)
        if not (isinstance(value, dict) and {"training", "testing"} <= set(value)):
            problems.append(f"torchvision {torchvision.__version__} lacks RegionProposalNetwork.{attr}"
                            f"['testing']")
    return problems


def resnet_fpn_extractor(backbone: nn.Module, trainable_layers: int,
                         norm_layer: Callable[..., nn.Module] | None = None, out_channels: int = 256) -> nn.Module:
    """torchvision's BackboneWithFPN over `backbone` (all four stages returned, LastLevelMaxPool),
    with `norm_layer` in the FPN (None: none) and `out_channels` per FPN level."""
    build = _private_function("torchvision.models.detection.backbone_utils", "_resnet_fpn_extractor")
    extractor = build(backbone, trainable_layers, norm_layer=norm_layer)
    if out_channels != extractor.out_channels:
        # torchvision fixes the width at 256; the public FPN class with the same inputs, extra
        # level and init gives the same module tree (and state-dict keys) at another width.
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        in_channels = [block[0].in_channels for block in extractor.fpn.inner_blocks]
        extractor.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool(),
                                              norm_layer=norm_layer)
        extractor.out_channels = out_channels
    return extractor


def setup_pooler_scales(pooler: nn.Module, feature_maps: list[Tensor], image_sizes: list[tuple[int, int]]) -> None:
    """Fill `pooler.scales` and `pooler.map_levels` as MultiScaleRoIAlign.forward does."""
    setup = _private_function("torchvision.ops.poolers", "_setup_scales")
    pooler.scales, pooler.map_levels = setup(feature_maps, image_sizes, pooler.canonical_scale, pooler.canonical_level)


def _budget_dicts(rpn: nn.Module) -> tuple[dict, dict]:
    dicts = tuple(getattr(rpn, attr, None) for attr in RPN_BUDGET_ATTRS)
    for attr, value in zip(RPN_BUDGET_ATTRS, dicts):
        if not (isinstance(value, dict) and "testing" in value):
            raise _missing(f"RegionProposalNetwork.{attr}['testing']")
    return dicts  # type: ignore[return-value]


def rpn_test_budgets(rpn: nn.Module) -> tuple[int, int]:
    """(pre-NMS top-n per level, post-NMS top-n) the RPN uses in eval mode."""
    pre, post = _budget_dicts(rpn)
    return int(pre["testing"]), int(post["testing"])


def set_rpn_test_budgets(rpn: nn.Module, pre_nms_top_n: int, post_nms_top_n: int) -> None:
    pre, post = _budget_dicts(rpn)
    pre["testing"], post["testing"] = int(pre_nms_top_n), int(post_nms_top_n)
