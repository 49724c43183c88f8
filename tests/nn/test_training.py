from __future__ import annotations

import pytest
import torch

from raysim.data import DatasetSpec
from raysim.methods.aggregation import weighted_average
from raysim.nn.training import ClientData, Preprocess, random_crop_flip

SPEC = DatasetSpec("t", 2, (1, 2, 2), (0.5,), (0.25,), 10.0, None)


def test_weighted_average_is_sample_weighted_and_casts_back():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(6)}
    out = weighted_average([a, b], [1, 2])
    assert torch.allclose(out["w"], torch.tensor([3.0, 6.0]))
    assert out["w"].dtype == torch.float32
    assert out["n"].dtype == torch.int64 and out["n"].item() == 5


def test_preprocess_scales_then_normalises():
    x = torch.full((1, 1, 2, 2), 5.0)
    assert torch.allclose(Preprocess(SPEC, torch.device("cpu"))(x), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize(("mean", "std", "scale"), [((0.5,), (0.25,), 10.0),
                                                   ((0.0,), (1.0,), 1.0),
                                                   ((-0.0,), (1.0,), 1.0)])
def test_preprocess_in_place_gives_the_formulas_bits_and_leaves_its_input(mean, std, scale):
    spec = DatasetSpec("t", 2, (1, 2, 2), mean, std, scale, None)
    stored = torch.randn(7, 1, 2, 2) * 20
    stored[3, 0, 0, 0] = -0.0  # x − (−0) is +0: the sign bit must come out as the formula's
    batch = stored[2:6]  # a view of stored samples, as evaluation passes them
    kept = stored.clone()
    out = Preprocess(spec, torch.device("cpu"))(batch)
    expected = (batch / scale - torch.tensor(mean).view(1, 1, 1, 1)) \
        / torch.tensor(std).view(1, 1, 1, 1)
    assert torch.equal(out, expected) and out.data_ptr() != batch.data_ptr()
    assert torch.equal(out.signbit(), expected.signbit())  # equal() holds −0 == +0
    assert torch.equal(stored, kept)
    images = torch.randint(0, 256, (3, 5, 1, 2, 2), dtype=torch.uint8)  # a group's batches
    assert torch.equal(Preprocess(spec, torch.device("cpu"))(images),
                       (images.float() / scale - torch.tensor(mean).view(1, 1, 1, 1))
                       / torch.tensor(std).view(1, 1, 1, 1))
    flat = torch.randn(4, 2)  # fewer dimensions than the mean's: broadcast, as the formula
    assert Preprocess(spec, torch.device("cpu"))(flat).shape == (1, 1, 4, 2)
    colour = DatasetSpec("c", 2, (3, 2, 2), mean * 3, std * 3, scale, None)
    grey = torch.randn(2, 1, 2, 2)  # one channel against three channels' statistics
    widened = Preprocess(colour, torch.device("cpu"))(grey)
    assert widened.shape == (2, 3, 2, 2)
    assert torch.equal(widened, (grey / scale - torch.tensor(mean * 3).view(1, 3, 1, 1))
                       / torch.tensor(std * 3).view(1, 3, 1, 1))


def test_epoch_visits_every_sample_once_and_drops_a_trailing_single():
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10)
    indices = torch.tensor([0, 2, 3, 5, 7, 9, 8])
    data = ClientData(x, y, indices, Preprocess(SPEC, torch.device("cpu")))
    batches = list(data.batches(3, torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [3, 3]  # 7 = 3 + 3 + 1: the single is dropped
    seen = torch.cat([b[1] for b in batches])
    assert len(set(seen.tolist())) == 6 and set(seen.tolist()) <= set(indices.tolist())
    again = list(data.batches(3, torch.Generator().manual_seed(0)))
    assert all(torch.equal(p[1], q[1]) for p, q in zip(batches, again))
    assert torch.equal(data.labels, y[indices])


def test_random_crop_flip_keeps_shape_and_is_a_shifted_or_flipped_copy():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    out = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    for i in range(2):  # with no padding the only change left is the flip
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = random_crop_flip(x, torch.Generator().manual_seed(2), padding=2)
    assert out.shape == x.shape
    same = random_crop_flip(x, torch.Generator().manual_seed(2), padding=2)
    assert torch.equal(out, same)
    # every output pixel is either padding (0) or some input pixel
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_rot_flip_moves_images_and_masks_together():
    spec = DatasetSpec("s", 2, (1, 4, 4), (0.0,), (1.0,), 1.0, "rot_flip")
    pre = Preprocess(spec, torch.device("cpu"))
    y = torch.arange(16, dtype=torch.uint8).view(1, 4, 4).repeat(8, 1, 1)
    x = y[:, None].clone()  # the image equals its mask, so any transform must keep them equal
    gx, gy = pre.batch(x, y, torch.Generator().manual_seed(0))
    assert gy.dtype == torch.int64 and gy.shape == (8, 4, 4)
    assert torch.equal(gx[:, 0].long(), gy)
    assert len({tuple(m.flatten().tolist()) for m in gy}) > 1  # not all left unchanged
    for m in gy:  # every output is one of the 8 symmetries of the square
        assert sorted(m.flatten().tolist()) == list(range(16))


def test_kept_optimizer_state_carries_adam_moments_across_rounds():
    from algorithms.fedavg import FedAvg
    from raysim.algorithm import Broadcast, ClientContext, TaskInfo
    from raysim.config import TrainConfig
    from raysim.nn.models import build_model

    train = TrainConfig(local_epochs=1, batch_size=4, lr=1e-3, optimizer="adam",
                        keep_optimizer_state=True)
    info = TaskInfo(num_classes=2, input_shape=(1, 2, 2), feature_dim=None, train=train)
    method = FedAvg(None, info)
    model = build_model("logreg", (1, 2, 2), 2)
    x = torch.rand(8, 1, 2, 2) * 10
    data = ClientData(x, torch.arange(8) % 2, torch.arange(8), Preprocess(SPEC,
                                                                          torch.device("cpu")))
    broadcast = Broadcast(weights={k: v.clone() for k, v in model.state_dict().items()})

    def ctx(r: int, settings: TrainConfig = train) -> ClientContext:
        return ClientContext(0, r, torch.Generator().manual_seed(r), torch.device("cpu"),
                             settings)

    first = method.client_update(ctx(1), model, broadcast, data, None)
    steps = first.state["optimizer"]["state"][0]["step"].item()
    assert steps == 2
    second = method.client_update(ctx(2), model, broadcast, data, first.state)
    assert second.state["optimizer"]["state"][0]["step"].item() == 2 * steps
    fresh = method.client_update(ctx(2), model, broadcast, data, None)
    assert not torch.equal(fresh.weights["classifier.weight"], second.weights["classifier.weight"])
    assert method.client_update(ctx(1, TrainConfig()), model, broadcast, data, None).state is None
