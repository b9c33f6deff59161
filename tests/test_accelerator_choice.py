"""The default trainer (``trainer=auto``) trains on a CUDA GPU where there is one and on the CPU
otherwise, its precision following, and the run's first lines say what it chose. CUDA is mocked."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from scalelong.cli.train import build_trainer
from scalelong.config import describe_accelerator


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: torch sees n CUDA GPUs (0: none)."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def trainer_of(*overrides: str) -> dict:
    return compose(list(overrides))["trainer"]


def test_without_a_gpu_the_default_is_the_cpu_in_full_precision(gpus):
    gpus(0)
    t = trainer_of()
    assert (t["accelerator"], t["devices"], t["precision"]) == ("cpu", 1, "32-true")
    assert describe_accelerator(t) == "accelerator: cpu, 32-true (no CUDA GPU found)"


def test_with_gpus_the_default_is_one_gpu_in_bf16_and_says_how_to_use_them_all(gpus):
    gpus(1)
    t = trainer_of()
    assert (t["accelerator"], t["devices"], t["precision"]) == ("gpu", 1, "bf16-mixed")
    assert describe_accelerator(t) == "accelerator: gpu, 1 of 1 GPU, bf16-mixed"
    assert trainer_of("gpu_precision=16-mixed")["precision"] == "16-mixed"  # the paper's fp16
    gpus(8)
    assert describe_accelerator(trainer_of()) == "accelerator: gpu, 1 of 8 GPUs, bf16-mixed; use all 8 with trainer=ddp"
    assert describe_accelerator(trainer_of("trainer=ddp")) == "accelerator: gpu, 8 of 8 GPUs, bf16-mixed"
    assert describe_accelerator(trainer_of("trainer=ddp", "trainer.devices=4")) == (
        "accelerator: gpu, 4 of 8 GPUs, bf16-mixed; all 8 with trainer.devices=-1")
    # Chosen by hand, as before: the CPU on a GPU machine says what it leaves idle.
    cpu = trainer_of("trainer=cpu")
    assert (cpu["accelerator"], cpu["precision"]) == ("cpu", "32-true")
    assert describe_accelerator(cpu) == "accelerator: cpu, 32-true (8 CUDA GPUs idle; trainer=auto or gpu uses one)"


def test_trainer_groups_chosen_by_hand_do_not_depend_on_the_machine(gpus):
    for n in (0, 2):
        gpus(n)
        assert [trainer_of(f"trainer={name}")["accelerator"] for name in ("cpu", "gpu", "ddp")] == ["cpu", "gpu", "gpu"]
        ddp_cpu = trainer_of("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
        strategy = ddp_cpu["strategy"]
        assert (strategy["_target_"], ddp_cpu["precision"]) == ("pytorch_lightning.strategies.DDPStrategy", "32-true")


def test_the_run_prints_its_choice_first(gpus, tmp_path, capsys):
    gpus(0)
    trainer = build_trainer(trainer_of(), 1, [], [], tmp_path)
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert "accelerator: cpu, 32-true (no CUDA GPU found)\n" in capsys.readouterr().out
