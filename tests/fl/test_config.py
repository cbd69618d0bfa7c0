"""strato.toml: the job's settings, and [dataset.NAME] shaping a job for its data."""

from __future__ import annotations

from pathlib import Path

import pytest

from strato.data import dataset_name
from strato.errors import ConfigError
from strato.fl.config import dataset_settings, load_job_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mnist" / "strato.toml"

TOML = """
[job]
rounds = 5
clients = 100
clients_per_round = 10

[train]
epochs = 1
lr = 0.1

[dataset.digits]
clients = 10
round_deadline_s = 30

[dataset.digits.train]
epochs = 2
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "strato.toml"
    path.write_text(text)
    return path


def test_dataset_section_applies_only_to_its_dataset(tmp_path: Path) -> None:
    path = _write(tmp_path, TOML)
    digits = load_job_config(path, "digits")
    assert (digits.clients, digits.clients_per_round, digits.round_deadline_s) == (10, 10, 30)
    assert digits.train == {"epochs": 2, "lr": 0.1}
    for other in (load_job_config(path, "mnist"), load_job_config(path)):
        assert (other.clients, other.round_deadline_s) == (100, 120.0)
        assert other.train == {"epochs": 1, "lr": 0.1}
    assert dataset_settings(path, "digits") == {"clients": 10, "round_deadline_s": 30,
                                                "train": {"epochs": 2}}
    assert dataset_settings(path, "mnist") == {}


def test_dataset_section_keeps_the_job_valid(tmp_path: Path) -> None:
    path = _write(tmp_path, TOML.replace("clients = 10\nround", "clients = 5\nround"))
    with pytest.raises(ConfigError, match=r"clients_per_round \(10\) exceeds clients \(5\)"):
        load_job_config(path, "digits")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[dataset.digits]\nepochs = 2\n", "unknown setting.*'epochs'.*dataset.digits"),
        ("[dataset]\nclients = 3\n", r"\[dataset\] must hold tables"),
        ("[dataset.digits]\ntrain = 3\n", r"\[dataset.digits.train\] must be a table"),
    ],
)
def test_bad_dataset_sections(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_job_config(_write(tmp_path, text), "digits")


def test_which_dataset_a_run_gets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STRATO_DATA_DIR", raising=False)
    assert dataset_name(None) == "digits"
    assert dataset_name("") == "digits"
    assert dataset_name(str(tmp_path)) == "mnist"
    monkeypatch.setenv("STRATO_DATA_DIR", str(tmp_path))
    assert dataset_name(None) == "mnist"


def test_the_example_gives_each_client_enough_digits() -> None:
    """The README's first command without MNIST: 100 clients of ~14 images learned
    nothing much (0.50 after 20 rounds); the example shapes the job for the digits."""
    digits, mnist = load_job_config(EXAMPLE, "digits"), load_job_config(EXAMPLE, "mnist")
    assert mnist.clients == 100
    assert digits.clients == 10 and digits.clients_per_round == 10


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[job]\nrounds = "4"\n', "'rounds' (in [job] of strato.toml) must be a whole number, "
         "got a string ('4')"),
        ("[round]\nquorum = true\n", "'quorum' (in [round] of strato.toml) must be a number"),
        ("[job]\nseed = 1.5\n", "'seed' (in [job] of strato.toml) must be a whole number"),
        ('[aggregation]\nfunction_memory_mb = "1G"\n', "'function_memory_mb'"),
        ("[strategy]\nname = 3\n", "'strategy' (in [strategy] of strato.toml) must be a string"),
        ("[dataset.digits]\nclients = 2.5\n", "'clients'"),
    ],
)
def test_every_setting_is_type_checked_by_name(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_job_config(_write(tmp_path, text), "digits")
    assert needle in str(err.value)


def test_a_whole_number_is_a_number() -> None:
    path_free = load_job_config(Path("/nonexistent/strato.toml"))
    assert path_free.override(quorum=1, round_deadline_s=30).quorum == 1
