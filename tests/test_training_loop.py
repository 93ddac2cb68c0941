"""training/loop.py on a linear model (CPU, seconds): the shared loop against a hand-written one, and phase order."""

import json
from pathlib import Path

import torch

from training.common import CommonConfig, make_accelerator
from training.loop import Phase, train


def _config(out: Path, **overrides) -> CommonConfig:
    values = dict(
        output_dir=str(out),
        max_steps=4,
        gradient_accumulation_steps=2,
        checkpointing_steps=2,
        checkpoints_total_limit=None,
        validation_steps=2,
        log_steps=100,
        max_grad_norm=0.5,
        mixed_precision="no",
        report_to="none",
        num_workers=0,
    )
    return CommonConfig(**{**values, **overrides})


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 2, 3, generator=gen), torch.randn(16, 2, 1, generator=gen) * 4  # [micro-batches, 2, ·]


def _prepared(cfg: CommonConfig):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # SGD: clipping and accumulation change the step
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = make_accelerator(cfg)
    return accelerator, *accelerator.prepare(model, optimizer, schedule)


def test_train_is_the_hand_written_accumulate_clip_step_loop(tmp_path):
    cfg = _config(tmp_path)
    x, y = _data()
    accelerator, model, optimizer, schedule = _prepared(cfg)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(accelerator.unwrap_model(model).state_dict())

    def loss(i):
        mse = torch.nn.functional.mse_loss(model(x[i]), y[i])
        return mse, {"loss_part": 2 * mse.item()}

    phase = Phase(next_batch=lambda step, micro: 2 * step + micro, loss=loss, params=list(model.parameters()))
    snapshots, validated = [], []

    def record(step, info, unwrapped):
        snapshots.append((step, info, [p.detach().clone() for p in unwrapped.parameters()]))

    losses = train(
        accelerator,
        cfg,
        model,
        optimizer,
        schedule,
        phase,
        start_step=0,
        trainables=dict(model.named_parameters()),
        stage="toy",
        validate=validated.append,
        callback=record,
    )

    # By hand: the mean of two micro-batch losses, one backward each, the summed gradient clipped to 0.5, one SGD step.
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(4):
        micro_losses = []
        for micro in range(2):
            i = 2 * step + micro
            mse = torch.nn.functional.mse_loss(reference(x[i]), y[i])
            (mse / 2).backward()
            micro_losses.append(mse.item())
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.5)
        sgd.step()
        sgd.zero_grad(set_to_none=True)
        assert losses[step] == micro_losses[0] / 2 + micro_losses[1] / 2
        at, info, params = snapshots[step]
        assert at == step + 1 and info == {
            "loss": losses[step],
            "loss_part": 2 * micro_losses[1],
        }  # last micro's parts
        for got, want in zip(params, reference.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)
    assert validated == [2, 4]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [list(r) for r in rows] == [["step", "loss", "loss_part", "lr"]] * 4
    assert [r["loss"] for r in rows] == losses
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-000002", "checkpoint-000004"]
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-000004" / "trainer_state.json").read_text())
    assert state == {"global_step": 4, "stage": "toy"}


def test_a_phase_schedule_begins_each_step_before_its_batches_and_names_its_loss(tmp_path):
    cfg = _config(tmp_path, max_steps=3, validation_steps=0, checkpointing_steps=100)
    x, y = _data()
    accelerator, model, optimizer, schedule = _prepared(cfg)
    events = []

    def phase(name):
        def next_batch(step, micro):
            events.append((name, "batch", step, micro))
            return 2 * step + micro

        def loss(i):
            return torch.nn.functional.mse_loss(model(x[i]), y[i]), {}

        return Phase(
            next_batch, loss, list(model.parameters()), name=name, begin=lambda: events.append((name, "begin"))
        )

    phases = {"odd": phase("odd"), "even": phase("even")}
    infos = []
    train(
        accelerator,
        cfg,
        model,
        optimizer,
        schedule,
        lambda step: phases["odd" if step % 2 else "even"],
        start_step=0,
        trainables={},
        stage="toy",
        callback=lambda step, info, m: infos.append(info),
    )
    assert events == [
        ("odd", "begin"),
        ("odd", "batch", 0, 0),
        ("odd", "batch", 0, 1),
        ("even", "begin"),
        ("even", "batch", 1, 0),
        ("even", "batch", 1, 1),
        ("odd", "begin"),
        ("odd", "batch", 2, 0),
        ("odd", "batch", 2, 1),
    ]
    assert [info["phase"] for info in infos] == ["odd", "even", "odd"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows] == [
        ["loss_odd_total", "lr", "step"],
        ["loss_even_total", "lr", "step"],
        ["loss_odd_total", "lr", "step"],
    ]
    assert [r[f"loss_{i['phase']}_total"] for r, i in zip(rows, infos)] == [i["loss"] for i in infos]
