"""The fold ensemble in the MLflow registry: alias promotion by CV score, loading by alias, the data contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lumbar_ray.config import Config, CropConfig
from lumbar_ray.constants import SEVERITIES, TARGETS
from lumbar_ray.models import build_model
from lumbar_ray.registry import ensemble_contract, load_ensemble, log_and_register
from lumbar_ray.tracking import Tracker

FOLDS = [0, 1]
DIGEST = "data-00000000000000aa"


def _states(cfg: Config, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    states = {}
    for fold in FOLDS:
        torch.manual_seed(seed * 10 + fold)
        model = build_model(cfg.model, cfg.crop)
        with torch.no_grad():  # move the heads away from the prior, so folds really differ in their outputs
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        states[fold] = {key: value.clone() for key, value in model.state_dict().items()}
    return states


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Three CVs registered one after another with CV scores 0.5, 0.6 and 0.4 (lower is better)."""
    root = tmp_path_factory.mktemp("registry")
    cfg = Config.model_validate({
        "workdir": str(root / "work"),
        "crop": {"size": 32, "slices": 3},
        "model": {"arch": "tiny"},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "registry-tests"},
    })  # fmt: skip
    tracker = Tracker.from_config(cfg)
    contract = ensemble_contract(cfg, FOLDS)
    global_uri = mlflow.get_tracking_uri()
    results, states, parents = [], [], []
    for i, score in enumerate((0.5, 0.6, 0.4)):
        parent = tracker.parent_run(f"cv-{i}", kind="cv")
        state = _states(cfg, seed=i)
        results.append(log_and_register(state, contract, cfg.tracking, tracker.uri, parent, score, data_digest=DIGEST))
        states.append(state)
        parents.append(parent)
    return {
        "cfg": cfg,
        "uri": tracker.uri,
        "contract": contract,
        "results": results,
        "states": states,
        "parents": parents,
        "global_uri": global_uri,
    }


def test_alias_moves_only_to_a_better_score(registered) -> None:
    first, worse, better = registered["results"]
    assert (first.version, first.alias_moved, first.previous_alias_score) == (1, True, None)
    assert (worse.version, worse.alias_moved, worse.previous_alias_score) == (2, False, 0.5)
    assert (better.version, better.alias_moved, better.previous_alias_score) == (3, True, 0.5)
    client = MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    cfg = registered["cfg"]
    holder = client.get_model_version_by_alias(cfg.tracking.model_name, cfg.tracking.alias)
    assert int(holder.version) == 3
    version2 = client.get_model_version(cfg.tracking.model_name, "2")
    assert float(version2.tags["cv_score"]) == 0.6
    assert version2.tags["mlflow_run_id"] == registered["parents"][1]
    assert version2.tags["lumbar_ray.run_id"] == "cv-1"
    assert version2.run_id == registered["parents"][1]  # logged into the CV's parent run
    assert version2.tags["lumbar_ray.data_digest"] == DIGEST
    assert "does not beat holder v1's 0.50000 on the same data" in str(worse)
    assert "beats holder v1's 0.50000" in better.reason and first.reason == "no version held it"


def test_a_second_model_logged_into_the_same_run_leaves_the_first_versions_files_alone(registered) -> None:
    """Registering a CV's folds again (e.g. with another localiser) logs a second model into the CV's run: under a
    path of its own, so the version registered first still loads its own weights."""
    cfg, uri, parent = registered["cfg"], registered["uri"], registered["parents"][0]
    other = cfg.tracking.model_copy(update={"model_name": "registry-tests-again"})
    again = log_and_register(_states(cfg, seed=7), registered["contract"], other, uri, parent, 0.5,
                             data_digest=DIGEST)  # fmt: skip
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    first = client.get_model_version(cfg.tracking.model_name, "1")
    second = client.get_model_version(other.model_name, str(again.version))
    assert first.source.endswith("/ensemble") and second.source.endswith("/ensemble_2")
    crops = np.random.default_rng(1).random((2, 25, 3, 32, 32), dtype=np.float32)
    first_loaded = load_ensemble(f"models:/{cfg.tracking.model_name}/1", uri)
    second_loaded = load_ensemble(f"models:/{other.model_name}/{again.version}", uri)
    expected = _direct(cfg, registered["states"][0][0], crops)
    np.testing.assert_allclose(first_loaded.predict_crops(crops, fold=0), expected, atol=1e-5)
    assert np.abs(second_loaded.predict_crops(crops, fold=0) - expected).max() > 1e-3


def test_the_alias_never_moves_to_a_version_of_other_data(registered) -> None:
    """A holder of another data digest, or of none (registered before digests), keeps the alias whatever the
    scores: they were measured on different data. The result and the log say why."""
    cfg = registered["cfg"].model_copy(deep=True)
    cfg.tracking.model_name = "lineage_ensemble"
    tracker = Tracker.from_config(cfg)
    contract = ensemble_contract(cfg, [0])
    state = {0: registered["states"][0][0]}

    def register(score: float, digest: str | None):
        return log_and_register(state, contract, cfg.tracking, tracker.uri, tracker.parent_run("cv-lineage", "cv"),
                                score, data_digest=digest)  # fmt: skip

    unknown = register(0.5, None)  # as a version registered before digests were recorded
    assert unknown.alias_moved and unknown.data_digest is None
    newer = register(0.1, DIGEST)
    assert (newer.alias_moved, newer.previous_alias_score) == (False, 0.5)
    assert "holder v1 has no lumbar_ray.data_digest tag" in str(newer) and "not compared" in newer.reason
    client = MlflowClient(tracking_uri=tracker.uri, registry_uri=tracker.uri)
    client.set_registered_model_alias(cfg.tracking.model_name, cfg.tracking.alias, str(newer.version))  # by hand
    other = register(0.05, "data-00000000000000bb")
    assert not other.alias_moved and "trained on other data (data-00000000000000aa" in other.reason
    same = register(0.09, DIGEST)
    assert same.alias_moved and same.previous_alias_score == 0.1
    undigested = register(0.01, None)
    assert not undigested.alias_moved and "no data digest" in undigested.reason
    holder = client.get_model_version_by_alias(cfg.tracking.model_name, cfg.tracking.alias)
    assert int(holder.version) == same.version and "lumbar_ray.data_digest" not in client.get_model_version(
        cfg.tracking.model_name, str(undigested.version)).tags  # fmt: skip


def test_registration_leaves_runs_and_globals_alone(registered) -> None:
    client = MlflowClient(tracking_uri=registered["uri"])
    assert all(client.get_run(parent).info.status == "RUNNING" for parent in registered["parents"])
    assert mlflow.active_run() is None
    assert mlflow.get_tracking_uri() == registered["global_uri"]


def _direct(cfg: Config, state: dict[str, torch.Tensor], crops: np.ndarray) -> np.ndarray:
    model = build_model(cfg.model, cfg.crop)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(crops)), dim=-1).numpy()


def test_load_by_alias_reproduces_the_folds(registered) -> None:
    cfg = registered["cfg"]
    loaded = load_ensemble(f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}", registered["uri"])
    assert loaded.contract == registered["contract"]
    crops = np.random.default_rng(0).random((3, 25, 3, 32, 32), dtype=np.float32)
    state = registered["states"][2]  # the champion: the third registration
    fold0, fold1 = _direct(cfg, state[0], crops), _direct(cfg, state[1], crops)
    assert np.abs(fold0 - fold1).max() > 1e-3  # the mean below is not trivially one fold's output
    np.testing.assert_allclose(loaded.predict_crops(crops, fold=0), fold0, atol=1e-5)
    np.testing.assert_allclose(loaded.predict_crops(crops, fold=1), fold1, atol=1e-5)
    mean = loaded.predict_crops(crops.astype(np.float64), batch_size=2)  # cast to the signature's float32
    assert mean.shape == (3, 25, 3)
    np.testing.assert_allclose(mean, (fold0 + fold1) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="fold 7"):
        loaded.predict_crops(crops, fold=7)
    with pytest.raises(MlflowException):  # the raw pyfunc enforces the float32 tensor signature
        loaded.model.predict(crops.astype(np.float64))


def test_contract(registered, tmp_path: Path) -> None:
    contract = registered["contract"]
    assert json.loads(json.dumps(contract)) == contract
    assert contract["input"]["shape"] == [-1, 25, 3, 32, 32]
    assert contract["classes"] == list(SEVERITIES) and contract["targets"] == list(TARGETS)
    assert contract["folds"] == FOLDS
    assert contract["crop"] == {"size": 32, "region": 48, "region_mm": None, "slices": 3}  # one view: no second_view
    assert contract["input"]["views"] == 1
    assert contract["model"]["arch"] == "tiny"
    assert contract["preprocess"]["dtype"] == "uint8" and contract["preprocess"]["image_size"] == 256
    assert set(contract["versions"]) == {"lumbar_ray", "torch", "timm", "mlflow"}
    assert all(isinstance(version, str) and version for version in contract["versions"].values())
    # the registered artifact holds the same contract, readable without lumbar_ray
    client = MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    cfg = registered["cfg"]
    source = client.get_model_version_download_uri(cfg.tracking.model_name, "1")
    folder = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path), tracking_uri=registered["uri"]))
    assert json.loads((folder / "artifacts" / "contract.json").read_text()) == contract
    assert {path.name for path in (folder / "artifacts").glob("fold_*.pt")} == {"fold_0.pt", "fold_1.pt"}
    assert (folder / "code" / "lumbar_ray" / "registry.py").is_file()  # self-contained code


def test_the_contract_carries_the_crop_rule_prediction_cuts_with() -> None:
    """Prediction rebuilds its crop settings from the contract alone: a region in millimetres travels with it."""
    cfg = Config.model_validate({"crop": {"size": 32, "region": 48, "region_mm": 40.0, "slices": 3}})
    contract = json.loads(json.dumps(ensemble_contract(cfg, FOLDS)))
    assert CropConfig(**contract["crop"]) == cfg.crop and contract["crop"]["region_mm"] == 40.0


def test_a_two_view_model_registers_its_50_crop_input_and_predicts_as_its_network(tmp_path: Path) -> None:
    """``crop.second_view`` travels in the contract: prediction cuts 50 crops by it, the signature expects them and
    the loaded model predicts what its network does."""
    from lumbar_ray.registry import contract_inputs, signature_for

    cfg = Config.model_validate({
        "workdir": str(tmp_path / "work"),
        "crop": {"size": 32, "slices": 3, "second_view": True},
        "model": {"arch": "tiny"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "views-tests",
                     "model_name": "views_ensemble"},
    })  # fmt: skip
    contract = json.loads(json.dumps(ensemble_contract(cfg, [0])))
    assert contract["input"]["shape"] == [-1, 50, 3, 32, 32] and contract["input"]["views"] == 2
    assert contract["crop"]["second_view"] is True and contract_inputs(contract)["crops"].views == 2
    assert signature_for(contract).inputs.inputs[0].shape == (-1, 50, 3, 32, 32)
    tracker = Tracker.from_config(cfg)
    state = _states(cfg, seed=6)[0]
    assert "view_embedding.weight" in state
    parent = tracker.parent_run("cv-views", kind="cv")
    result = log_and_register({0: state}, contract, cfg.tracking, tracker.uri, parent, 0.5)
    loaded = load_ensemble(result.model_uri, tracker.uri)
    crops = np.random.default_rng(3).random((2, 50, 3, 32, 32), dtype=np.float32)
    crops[:, 25 + 15 :] = 0.0  # the subarticular targets have no second view
    np.testing.assert_allclose(loaded.predict_crops(crops, fold=0), _direct(cfg, state, crops), atol=1e-5)
    with pytest.raises(MlflowException):  # one view's crops do not fit a two-view model's signature
        loaded.model.predict(crops[:, :25].copy())


def test_mismatched_folds_are_refused(registered) -> None:
    cfg = registered["cfg"]
    with pytest.raises(ValueError, match="contract names"):
        log_and_register({0: {}}, registered["contract"], cfg.tracking, registered["uri"], "unused", 0.1)


@pytest.mark.slow
def test_registered_model_loads_in_a_fresh_process_from_its_own_code(registered, tmp_path: Path) -> None:
    """The version carries lumbar_ray (``code_paths``): a fresh process loads it from there, not from the checkout."""
    script = (
        "import sys, numpy as np, mlflow\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "model = mlflow.pyfunc.load_model(sys.argv[2])\n"
        "print(sys.modules['lumbar_ray'].__file__)\n"
        "print(model.predict(np.zeros((2, 25, 3, 32, 32), np.float32)).shape)\n"
    )
    cfg = registered["cfg"]
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    completed = subprocess.run(
        [sys.executable, "-c", script, registered["uri"], f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    module_file, shape = completed.stdout.strip().splitlines()[-2:]
    assert Path(module_file).parts[-3:] == ("code", "lumbar_ray", "__init__.py")
    assert shape == "(2, 25, 3)"


def test_unknown_model_alias_or_version_is_named(registered) -> None:
    from lumbar_ray.registry import ModelNotFoundError, read_contract

    cfg, uri = registered["cfg"], registered["uri"]
    with pytest.raises(ModelNotFoundError, match="no registered model named 'nope'"):
        load_ensemble("models:/nope@champion", uri)
    with pytest.raises(ModelNotFoundError, match="has no alias 'gold'"):
        read_contract(f"models:/{cfg.tracking.model_name}@gold", uri)
    with pytest.raises(ModelNotFoundError, match="has no version '9'"):
        read_contract(f"models:/{cfg.tracking.model_name}/9", uri)
    assert read_contract(f"models:/{cfg.tracking.model_name}/2", uri) == registered["contract"]


def test_latest_version_and_run_uris_resolve(registered) -> None:
    from lumbar_ray.registry import model_source

    cfg, uri = registered["cfg"], registered["uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    latest = model_source(f"models:/{cfg.tracking.model_name}/latest", uri)
    assert latest == client.get_model_version_download_uri(cfg.tracking.model_name, "3")
    assert model_source("runs:/abc/ensemble", uri) == "runs:/abc/ensemble"  # MLflow's own URIs pass through


def test_the_registered_model_applies_the_flip_tta_as_the_validation_does(tmp_path: Path) -> None:
    """``model.tta_flip`` travels in the contract: the loaded model predicts what the OOF path
    (:func:`lumbar_ray.train.steps.predict` on the fold's network) predicted, and not the network without the flip."""
    from torch.utils.data import DataLoader

    from lumbar_ray.train.steps import predict

    cfg = Config.model_validate({
        "workdir": str(tmp_path / "work"),
        "crop": {"size": 32, "slices": 3},
        "model": {"arch": "tiny", "tta_flip": True},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tta-tests",
                     "model_name": "tta_ensemble"},
    })  # fmt: skip
    tracker = Tracker.from_config(cfg)
    state = _states(cfg, seed=5)[0]
    result = log_and_register({0: state}, ensemble_contract(cfg, [0]), cfg.tracking, tracker.uri,
                              tracker.parent_run("cv-tta", kind="cv"), 0.5)  # fmt: skip
    loaded = load_ensemble(result.model_uri, tracker.uri)
    assert loaded.contract["model"]["tta_flip"] is True
    crops = np.random.default_rng(1).random((3, 25, 3, 32, 32), dtype=np.float32)
    crops *= np.random.default_rng(2).random((3, 25, 1, 1, 1), dtype=np.float32)  # targets that look different
    model = build_model(cfg.model, cfg.crop)
    model.load_state_dict(state)
    batches = [{"crops": torch.from_numpy(crops), "study_id": torch.arange(3), "labels": torch.zeros(3, 25),
                "mask": torch.ones(3, 25, dtype=torch.bool)}]  # fmt: skip
    validation = predict(model, DataLoader(batches, batch_size=None), torch.device("cpu")).probs
    np.testing.assert_allclose(loaded.predict_crops(crops, fold=0), validation, atol=1e-5)
    without = cfg.model_copy(update={"model": cfg.model.model_copy(update={"tta_flip": False})})
    assert np.abs(_direct(without, state, crops) - validation).max() > 1e-3  # the flip is really applied


# --- members and calibration: an ensemble of CVs in one version


def _member_config(tmp_path: Path, crop: dict, model: dict) -> Config:
    return Config.model_validate({
        "workdir": str(tmp_path / "work"),
        "crop": crop,
        "model": model,
        "loss": {"aux_slice_weight": 0.0 if model.get("pool") == "mean" else 0.5},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "members-tests",
                     "model_name": "members_ensemble"},
    })  # fmt: skip


def test_the_contract_round_trips_the_members_their_inputs_and_the_calibration(tmp_path: Path) -> None:
    from lumbar_ray.calibrate import Calibration
    from lumbar_ray.registry import contract_calibration, contract_inputs, contract_members

    small = _member_config(tmp_path, {"size": 32, "slices": 3}, {"arch": "tiny", "tta_flip": False})
    other = _member_config(tmp_path, {"size": 32, "region": 40, "slices": 5}, {"arch": "tiny", "tta_flip": True})
    same_crop = _member_config(tmp_path, {"size": 32, "slices": 3}, {"arch": "tiny", "pool": "mean", "tta_flip": False})
    calibration = Calibration({"spinal": np.array([0.2, 0.5, 0.3]), "foraminal": np.array([0.0, 1.0, 0.0]),
                               "subarticular": np.array([1 / 3, 1 / 3, 1 / 3])},
                              {"spinal": 0.87, "foraminal": 1.02, "subarticular": 0.99})  # fmt: skip
    contract = ensemble_contract(small, FOLDS, members=[("cv-a", small), ("cv-b", other), ("cv-c", same_crop)],
                                 calibration=calibration, calibration_info={"fitted_on": "last epoch"})  # fmt: skip
    contract = json.loads(json.dumps(contract))  # as contract.json and the MLmodel metadata hold it
    assert contract["contract_version"] == 2 and contract["calibration"]["fitted_on"] == "last epoch"
    assert contract_calibration(contract) == calibration
    members = contract_members(contract)
    assert [(m["name"], m["input"], m["model"]["tta_flip"]) for m in members] == [
        ("cv-a", "crops", False), ("cv-b", "crops_1", True), ("cv-c", "crops", False)]  # fmt: skip
    inputs = {name: crop.model_dump() for name, crop in contract_inputs(contract).items()}
    assert inputs == {"crops": {"size": 32, "region": 48, "region_mm": None, "slices": 3, "second_view": False},
                      "crops_1": {"size": 32, "region": 40, "region_mm": None, "slices": 5,
                                  "second_view": False}}  # fmt: skip
    assert contract["input"]["shape"] == [-1, 25, 3, 32, 32] and contract["crop"] == members[0]["crop"]
    with pytest.raises(ValueError, match="blends 3 parts but there are 1 members"):
        ensemble_contract(small, FOLDS, calibration=calibration)
    # a contract written before members existed is one member, one input, no calibration
    old = {key: value for key, value in contract.items() if key not in ("members", "inputs", "calibration")}
    assert [m["input"] for m in contract_members(old)] == ["crops"] and list(contract_inputs(old)) == ["crops"]
    assert contract_calibration(old) == Calibration.identity()


def test_a_registered_two_member_ensemble_blends_and_calibrates_what_its_members_predict(tmp_path: Path) -> None:
    """Two members of other architectures and crop geometries (one with the test-time flip, whose network returns
    log-probabilities): the loaded model predicts each member's fold mean, blended and calibrated as its contract
    says, from a dict of crops by input; one fold of each with ``fold``; the prior it falls back on is calibrated."""
    from lumbar_ray.calibrate import Calibration, apply_group_temperatures

    first = _member_config(tmp_path, {"size": 32, "slices": 3}, {"arch": "tiny"})
    second = _member_config(tmp_path, {"size": 32, "region": 40, "slices": 5},
                            {"arch": "tiny", "pool": "mean", "tta_flip": True})  # fmt: skip
    calibration = Calibration({"spinal": np.array([0.25, 0.75]), "foraminal": np.array([0.6, 0.4]),
                               "subarticular": np.array([1.0, 0.0])},
                              {"spinal": 0.8, "foraminal": 1.3, "subarticular": 1.0})  # fmt: skip
    prior = np.tile([0.6, 0.3, 0.1], (25, 1))
    contract = ensemble_contract(first, FOLDS, prior, fold_priors={0: prior, 1: prior[:, ::-1]},
                                 members=[("cv-a", first), ("cv-b", second)], calibration=calibration)  # fmt: skip
    states = [_states(first, seed=7), _states(second, seed=8)]
    tracker = Tracker.from_config(first)
    result = log_and_register(states, contract, first.tracking, tracker.uri,
                              tracker.parent_run("ens-test", kind="ensemble"), 0.4)  # fmt: skip
    loaded = load_ensemble(f"models:/{first.tracking.model_name}@{first.tracking.alias}", tracker.uri)
    assert result.version == 1 and [m["name"] for m in loaded.contract["members"]] == ["cv-a", "cv-b"]
    rng = np.random.default_rng(3)
    crops = {"crops": rng.random((3, 25, 3, 32, 32), dtype=np.float32),
             "crops_1": rng.random((3, 25, 5, 32, 32), dtype=np.float32)}  # fmt: skip
    direct = [[_direct(first, states[0][k], crops["crops"]) for k in FOLDS],
              [_direct(second, states[1][k], crops["crops_1"]) for k in FOLDS]]  # fmt: skip
    mean = calibration.apply([np.mean(member, axis=0) for member in direct])
    np.testing.assert_allclose(loaded.predict_crops(crops, batch_size=2), mean, atol=1e-5)
    fold1 = calibration.apply([member[1] for member in direct])
    np.testing.assert_allclose(loaded.predict_crops(crops, fold=1), fold1, atol=1e-5)
    assert np.abs(fold1 - np.mean([member[1] for member in direct], axis=0)).max() > 1e-3  # the blend is not the mean
    fold1_prior = apply_group_temperatures(prior[None, :, ::-1], calibration.temperatures)[0]
    np.testing.assert_allclose(loaded.calibrated_prior(1), fold1_prior)
    with pytest.raises(MlflowException):  # the named inputs are enforced: a single array cannot feed two geometries
        loaded.model.predict(crops["crops"])
    with pytest.raises(ValueError, match="2 members' states for the 1"):
        log_and_register(states, ensemble_contract(first, FOLDS), first.tracking, tracker.uri, "unused", 0.1)
