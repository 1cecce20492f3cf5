"""cellseg.tv_compat: everything cellseg takes from torchvision's private API is still there, and
each wrapper still does what cellseg relies on. A torchvision upgrade that breaks one fails here,
naming the version and the missing name."""
from __future__ import annotations

import importlib
import re

import pytest
import torch
import torchvision
from torchvision.models import resnet18
from torchvision.ops import MultiScaleRoIAlign

from cellseg import tv_compat
from cellseg.errors import BackendUnavailableError

torch.set_num_threads(1)


def test_installed_torchvision_has_everything_cellseg_uses():
    problems = tv_compat.check()
    assert not problems, "; ".join(problems)


def test_resnet_fpn_extractor_builds_a_five_level_fpn():
    backbone = tv_compat.resnet_fpn_extractor(resnet18(weights=None), 5)
    assert backbone.out_channels == 256
    with torch.no_grad():
        levels = backbone(torch.rand(1, 3, 64, 64))
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape[-2:]) for v in levels.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    normed = tv_compat.resnet_fpn_extractor(resnet18(weights=None), 3, norm_layer=torch.nn.BatchNorm2d)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in normed.fpn.modules())
    frozen = [n for n, p in normed.body.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1")) for n in frozen)  # 3 trainable stages


def test_setup_pooler_scales_matches_what_the_pooler_computes_itself():
    features = {"0": torch.rand(1, 4, 16, 16), "1": torch.rand(1, 4, 8, 8)}
    sizes = [(64, 64)]
    mine = MultiScaleRoIAlign(["0", "1"], 7, 2)
    tv_compat.setup_pooler_scales(mine, list(features.values()), sizes)
    assert mine.scales == [0.25, 0.125]
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 60, 60]])
    reference = MultiScaleRoIAlign(["0", "1"], 7, 2)
    pooled = reference(features, [boxes], sizes)  # torchvision sets its scales in forward
    assert reference.scales == mine.scales
    assert torch.equal(mine.map_levels([boxes]), reference.map_levels([boxes]))
    assert torch.equal(mine(features, [boxes], sizes), pooled)


def test_rpn_test_budgets_read_and_write_the_eval_mode_numbers():
    from cellseg.model import build_model, spec_from_data
    import numpy as np

    spec = spec_from_data("maskrcnn_resnet18_fpn", ("a",), (1,), np.array([10.0]), 5,
                          rpn_pre_nms_top_n_test=30, rpn_post_nms_top_n_test=20)
    rpn = build_model(spec).eval().rpn
    assert tv_compat.rpn_test_budgets(rpn) == (30, 20)
    tv_compat.set_rpn_test_budgets(rpn, 300, 200)
    assert tv_compat.rpn_test_budgets(rpn) == (300, 200)
    assert (rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (300, 200)  # what filter_proposals reads
    rpn.train()
    assert rpn.post_nms_top_n() == spec.rpn_post_nms_top_n_train  # training budgets untouched


def test_a_missing_private_name_is_reported_with_the_version(monkeypatch):
    utils = importlib.import_module("torchvision.models.detection.backbone_utils")
    monkeypatch.delattr(utils, "_resnet_fpn_extractor")
    problems = tv_compat.check()
    assert problems == [f"torchvision {torchvision.__version__} lacks "
                        f"torchvision.models.detection.backbone_utils._resnet_fpn_extractor"]
    with pytest.raises(BackendUnavailableError, match=re.escape(f"torchvision {torchvision.__version__} lacks ")
                       + ".*_resnet_fpn_extractor"):
        tv_compat.resnet_fpn_extractor(resnet18(weights=None), 5)


def test_a_missing_rpn_budget_attribute_is_reported(monkeypatch):
    from torchvision.models.detection import rpn as rpn_mod

    real_init = rpn_mod.RegionProposalNetwork.__init__

    def init_without_budget_dicts(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        del self._post_nms_top_n

    monkeypatch.setattr(rpn_mod.RegionProposalNetwork, "__init__", init_without_budget_dicts)
    assert tv_compat.check() == [f"torchvision {torchvision.__version__} lacks "
                                 f"RegionProposalNetwork._post_nms_top_n['testing']"]
    with pytest.raises(BackendUnavailableError, match="_post_nms_top_n"):
        tv_compat.rpn_test_budgets(tv_compat._tiny_rpn())


def test_resnet_fpn_extractor_at_another_width_keeps_keys_levels_and_norm():
    wide = tv_compat.resnet_fpn_extractor(resnet18(weights=None), 5, norm_layer=torch.nn.BatchNorm2d)
    narrow = tv_compat.resnet_fpn_extractor(resnet18(weights=None), 5, norm_layer=torch.nn.BatchNorm2d,
                                            out_channels=64)
    assert narrow.out_channels == 64
    assert list(narrow.state_dict()) == list(wide.state_dict())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in narrow.fpn.modules())
    with torch.no_grad():
        levels = narrow(torch.rand(1, 3, 64, 64))
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    assert {v.shape[1] for v in levels.values()} == {64}
