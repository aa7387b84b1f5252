"""htc.mask_head: a stage's head keeps Detectron2's mask-head contract, ``forward(x, instances)``;
the cascade calls the heads without instances, which chains them (``chain``); every stage is
built from ROI_MASK_HEAD.NAME; the stages' mask loss is Detectron2's, its logged rates read from
the device once per step."""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from conftest import make_batch, tiny_cfg, train_losses
from htc import HTCMaskHead, HybridTaskCascadeROIHeads
from htc.mask_head import class_logits, mask_loss, mask_targets, plain_1x1_conv

RATES = ("accuracy", "false_positive", "false_negative")


@ROI_MASK_HEAD_REGISTRY.register()
class _ChainableTestHead(HTCMaskHead):
    pass


class _ClassLogits(torch.nn.Module):
    def __init__(self, predictor: torch.nn.Conv2d):
        super().__init__()
        self.predictor = predictor

    def forward(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return class_logits(self.predictor, x, classes)


@pytest.fixture(scope="module")
def heads():
    return build_model(tiny_cfg()).roi_heads.mask_head


def _rois(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 32, 14, 14, generator=torch.Generator().manual_seed(0))


def test_forward_keeps_the_parent_contract(heads):
    head = heads[1]
    head.eval()
    inst = Instances((64, 64), pred_classes=torch.tensor([0, 2, 1]))
    with torch.no_grad():
        (out,) = head(_rois(), [inst])
    assert out.pred_masks.shape == (3, 1, 28, 28)
    assert ((out.pred_masks >= 0) & (out.pred_masks <= 1)).all()
    head.train()
    boxes = Boxes(torch.tensor([[0.0, 0, 32, 32], [8, 8, 40, 40], [16, 0, 64, 30]]))
    masks = BitMasks(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.5)
    inst = Instances((64, 64), proposal_boxes=boxes, gt_classes=torch.tensor([0, 1, 2]))
    inst.gt_masks = masks
    with EventStorage():
        losses = head(_rois(), [inst])
    assert set(losses) == {"loss_mask"} and losses["loss_mask"].requires_grad


def test_chain_passes_the_feature_to_the_next_stage(heads):
    logits, feat = heads[0].chain(_rois(), None)
    assert logits.shape == (3, 3, 28, 28) and feat.shape == (3, 32, 14, 14)
    none, next_feat = heads[1].chain(_rois(), feat, with_logits=False)
    assert none is None and next_feat.shape == feat.shape
    alone = heads[1].chain(_rois(), None)[1]
    assert not torch.equal(alone, next_feat)  # the previous stage's feature went in
    with pytest.raises(ValueError, match="no res_conv"):
        heads[0].chain(_rois(), feat)


def test_the_cascade_calls_each_stage_head_as_a_module():
    """Hooks on a stage's head fire on every pass (the cascade called ``chain``, bypassing them:
    a hook saw nothing, silently): in training stage t's loss runs heads 0..t (the mask
    information flow), at test time each head runs once; what a hook returns is what the
    cascade uses."""
    model = build_model(tiny_cfg())
    calls = []
    for stage, head in enumerate(model.roi_heads.mask_head):
        head.register_forward_hook(lambda module, args, out, stage=stage: calls.append(stage))
    train_losses(model, make_batch(1))
    assert sorted(calls) == [0, 0, 0, 1, 1, 2]
    calls.clear()
    model.eval()
    with torch.no_grad():
        (want,) = model(make_batch(1, with_gt=False))
        assert calls == [0, 1, 2] and len(want["instances"]) > 0
        last = model.roi_heads.mask_head[2]
        last.register_forward_hook(lambda module, args, out: (out[0] + 1000, out[1]))
        (got,) = model(make_batch(1, with_gt=False))
    assert not torch.equal(got["instances"].pred_masks, want["instances"].pred_masks)


@pytest.mark.parametrize("norm", ["", "GN", "BN"])
def test_information_flow_conv_takes_the_heads_norm(norm):
    """The reference's conv_res is a ConvModule of the head's norm_cfg: a 1x1 conv (with a bias
    only without a norm), the norm, a ReLU."""
    cfg = tiny_cfg()
    cfg.MODEL.ROI_MASK_HEAD.NORM = norm
    heads = build_model(cfg).roi_heads.mask_head
    assert heads[0].res_conv is None
    for head in heads[1:]:
        conv = head.res_conv
        assert type(conv.norm) is type(head.mask_fcn1.norm) and (conv.bias is None) == bool(norm)
        assert conv.kernel_size == (1, 1) and conv.activation is torch.nn.functional.relu
    conv, feat = heads[1].res_conv, torch.randn(3, 32, 14, 14)
    expected = torch.nn.functional.conv2d(feat, conv.weight, conv.bias)
    torch.testing.assert_close(conv(feat), (conv.norm(expected) if norm else expected).relu())


def test_chain_with_classes_computes_each_rois_class_alone():
    """Inference and the mask loss use one class per RoI: its channel alone equals the full
    predictor's (eagerly and in traced, exported graphs), and only those classes' predictor
    rows receive a gradient."""
    head = build_model(tiny_cfg()).roi_heads.mask_head[0]
    torch.nn.init.normal_(head.predictor.bias)  # Detectron2 starts it at 0
    classes = torch.tensor([2, 0, 2])
    every, feat = head.chain(_rois(), None)
    alone, feat_alone = head.chain(_rois(), None, classes=classes)
    assert alone.shape == (3, 1, 28, 28) and torch.equal(feat, feat_alone)
    torch.testing.assert_close(alone[:, 0], every[torch.arange(3), classes], rtol=0, atol=1e-6)
    x = head.deconv_relu(head.deconv(feat)).detach()
    traced = torch.jit.trace(_ClassLogits(head.predictor), (x, classes))
    torch.testing.assert_close(traced(x, classes), alone, rtol=0, atol=1e-5)
    alone.sum().backward()
    grad = head.predictor.weight.grad.flatten(1).abs().sum(1)
    assert (grad > 0).tolist() == [True, False, True]
    assert head.predictor.bias.grad.tolist() == [28 * 28, 0, 2 * 28 * 28]
    empty, _ = head.chain(_rois(0), None, classes=classes[:0])
    assert empty.shape == (0, 1, 28, 28)


class _StageLogits(torch.nn.Module):
    def __init__(self, head: HTCMaskHead):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.head.chain(x, None, classes=classes)[0]


class _Shifted(torch.nn.Conv2d):
    """A predictor whose call adds to the convolution (as a LoRA wrapper's does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


def test_a_predictor_that_is_not_the_plain_conv_is_called():
    """Where the predictor's call is not the 1x1 convolution alone (a subclass with its own
    forward, a hook), each RoI's class is selected from that call's output, and hooks fire.
    The predictor as built is the plain one, whose classes are computed alone."""
    head = build_model(tiny_cfg()).roi_heads.mask_head[0]
    assert plain_1x1_conv(head.predictor)
    classes = torch.tensor([2, 0, 2])
    want = head.chain(_rois(), None)[0][torch.arange(3), classes][:, None]
    calls = []
    hook = head.predictor.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(head.chain(_rois(), None, classes=classes)[0], want)
    assert calls == [1]
    hook.remove()
    conv = head.predictor
    conv.forward = lambda x: torch.nn.Conv2d.forward(conv, x) + 1  # set on the instance
    assert not plain_1x1_conv(conv)
    torch.testing.assert_close(head.chain(_rois(), None, classes=classes)[0], want + 1)
    del conv.forward
    head.predictor = _Shifted(conv.in_channels, conv.out_channels, 1)
    head.predictor.load_state_dict(conv.state_dict())
    torch.testing.assert_close(head.chain(_rois(), None, classes=classes)[0], want + 1)
    # traced (export) for 3 RoIs, the graph takes any number
    traced = torch.jit.trace(_StageLogits(head), (_rois(), classes))
    five = torch.tensor([1, 2, 0, 0, 2])
    torch.testing.assert_close(traced(_rois(5), five), head.chain(_rois(5), None, classes=five)[0])


@ROI_MASK_HEAD_REGISTRY.register()
class _EveryClassTestHead(HTCMaskHead):
    """A custom head whose ``chain`` returns every class's logits whatever ``classes``."""

    def chain(self, x, res_feat, with_logits=True, classes=None):
        return super().chain(x, res_feat, with_logits)


def test_a_head_that_returns_every_class_gives_the_masks_of_each_rois_class():
    cfg = tiny_cfg()
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    want_model = build_model(cfg).eval()
    cfg.MODEL.ROI_MASK_HEAD.NAME = "_EveryClassTestHead"
    model = build_model(cfg).eval()
    model.load_state_dict(want_model.state_dict())
    batch = make_batch(1, with_gt=False)
    with torch.no_grad():
        want, got = (m(batch)[0]["instances"] for m in (want_model, model))
    assert len(want) > 0 and len(set(want.pred_classes.tolist())) > 1
    torch.testing.assert_close(got.pred_masks, want.pred_masks)


def test_class_agnostic_heads_ignore_the_classes():
    cfg = tiny_cfg()
    cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = True
    head = build_model(cfg).roi_heads.mask_head[0]
    every, _ = head.chain(_rois(), None)
    alone, _ = head.chain(_rois(), None, classes=torch.tensor([2, 0, 1]))
    assert every.shape == alone.shape == (3, 1, 28, 28) and torch.equal(every, alone)


def test_every_stage_is_built_from_the_configured_head():
    cfg = tiny_cfg()
    cfg.MODEL.ROI_MASK_HEAD.NAME = "_ChainableTestHead"
    heads = build_model(cfg).roi_heads.mask_head
    assert [type(h) for h in heads] == [_ChainableTestHead] * 3
    assert [h.res_conv is not None for h in heads] == [False, True, True]


@ROI_MASK_HEAD_REGISTRY.register()
class _OnlyChainTestHead(MaskRCNNConvUpsampleHead):
    """Has the chain() that the cascade called before it called the heads as modules."""

    def chain(self, x, res_feat, with_logits=True, classes=None):
        return self.layers(x), x


@pytest.mark.parametrize("name", ["MaskRCNNConvUpsampleHead", "_OnlyChainTestHead"])
def test_a_head_that_cannot_chain_is_refused(name):
    cfg = tiny_cfg()
    cfg.MODEL.ROI_MASK_HEAD.NAME = name
    with pytest.raises(
        ValueError, match=f"'{name}' cannot pass features.*forward\\(x, \\*, res_feat"
    ):
        build_model(cfg)


def test_lazy_heads_that_cannot_chain_are_refused_at_build():
    """A LazyConfig's list of Detectron2's heads built and failed at the first step."""
    parts = HybridTaskCascadeROIHeads.from_config(
        tiny_cfg(), build_model(tiny_cfg()).backbone.output_shape()
    )
    shape = ShapeSpec(channels=32, height=14, width=14)
    parts["mask_head"] = [MaskRCNNConvUpsampleHead(shape, num_classes=3, conv_dims=[8, 8])] * 3
    with pytest.raises(
        ValueError, match="stages \\[0, 1, 2\\] \\(roi_heads.mask_head\\) cannot pass"
    ):
        HybridTaskCascadeROIHeads(**parts)


def _mask_case(num_classes: int, empty_image: bool = False):
    g = torch.Generator().manual_seed(3)
    boxes = Boxes(torch.tensor([[0.0, 0, 32, 32], [8, 8, 40, 40], [16, 0, 64, 30]]))
    masks = BitMasks(torch.rand(3, 64, 64, generator=g) > 0.5)
    first = Instances((64, 64), proposal_boxes=boxes, gt_classes=torch.tensor([0, 1, 2]))
    first.gt_masks = masks
    second = first[1:] if not empty_image else first[:0]
    logits = torch.randn(len(first) + len(second), num_classes, 28, 28, generator=g)
    return logits.requires_grad_(), [first, second]


@pytest.mark.parametrize("num_classes", [3, 1])  # class-specific, class-agnostic
@pytest.mark.parametrize("empty_image", [False, True])
def test_mask_loss_is_mask_rcnn_loss_with_its_rates_on_the_device(num_classes, empty_image):
    logits, instances = _mask_case(num_classes, empty_image)
    with EventStorage() as storage:
        want = mask_rcnn_loss(logits, instances)
        logged = [storage.latest()[f"mask_rcnn/{k}"][0] for k in RATES]
    loss, rates = mask_loss(logits, instances)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(rates.tolist(), logged)
    (grad,) = torch.autograd.grad(loss, logits)
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(grad, want_grad)


def _triangle(box: torch.Tensor) -> list:
    x1, y1, x2, y2 = box.tolist()
    return [[x1, y1, x2, y1, (x1 + x2) / 2, y2]]


@pytest.mark.parametrize("kind", ["polygons", "bitmaps of one size", "bitmaps of two sizes"])
def test_mask_targets_of_all_images_at_once_are_each_images(kind):
    g = torch.Generator().manual_seed(5)
    instances = []
    for count, size in ((3, 64), (0, 64), (4, 48 if kind.endswith("two sizes") else 64)):
        gt = torch.rand(count, 4, generator=g).mul(size / 2).sort(dim=1).values
        gt[:, 2:] += size / 2 - 1
        rois = Instances(
            (size, size), proposal_boxes=Boxes(gt + torch.randn(count, 4, generator=g))
        )
        if kind == "polygons":
            rois.gt_masks = PolygonMasks([_triangle(box) for box in gt])
        else:
            rois.gt_masks = BitMasks(torch.rand(count, size, size, generator=g) > 0.5)
        instances.append(rois)
    got = mask_targets(instances, 28)
    want = [x.gt_masks.crop_and_resize(x.proposal_boxes.tensor, 28) for x in instances]
    assert got.shape == (7, 28, 28) and torch.equal(got, torch.cat(want))
    assert got.float().mean() > 0.1


def test_mask_loss_without_rois_is_a_zero_with_a_gradient():
    logits, instances = _mask_case(3)
    loss, rates = mask_loss(logits[:0], [x[:0] for x in instances])
    assert loss.item() == 0.0 and loss.requires_grad and rates is None


def test_training_logs_each_stages_rates_and_pictures_with_mask_rcnn_loss(monkeypatch):
    """Each stage's rates are logged under its name; Detectron2's mask_rcnn_loss (four host
    syncs per call) runs only on the iterations that draw masks (VIS_PERIOD)."""
    import htc.roi_heads

    model = build_model(tiny_cfg())
    model.train()
    calls = []
    monkeypatch.setattr(htc.roi_heads, "mask_rcnn_loss", lambda *a: calls.append(a) or 0.0)
    with EventStorage(start_iter=1) as storage:
        model(make_batch())
        logged = storage.latest()
    assert not calls
    for stage in range(3):
        for name in RATES:
            assert 0.0 <= logged[f"stage{stage}/mask_rcnn/{name}"][0] <= 1.0
    for head in model.roi_heads.mask_head:
        head.vis_period = 1
    with EventStorage(start_iter=1):
        model(make_batch())
    assert len(calls) == 3
