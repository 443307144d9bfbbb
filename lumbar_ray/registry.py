"""The fold ensemble as an MLflow pyfunc model: logged into the CV's parent run, registered, alias-promoted.

A registered version is self-contained: one ``fold_<k>.pt`` state dict per fold, ``contract.json`` (the data
contract: crop geometry, model config, input scaling, class and target order, versions) and the lumbar_ray
package itself (``code_paths``), so ``mlflow.pyfunc.load_model("models:/<name>@champion")`` rebuilds the folds
anywhere lumbar_ray's few requirements are installed. A pyfunc ``PythonModel`` rather than
``mlflow.pytorch.log_model``: MLflow 3 exports PyTorch models with ``torch.export`` by default, which fixes the
batch size to the input example's and cannot hold five folds plus the softmax averaging.

A version holds one or more *members*: the folds of one trained CV each (a CV registers itself alone; ``lumbar-ray
ensemble`` combines several, e.g. two architectures). All members share the folds. Each member keeps what cropping
and building its networks needs (its ``crop`` and ``model`` configs; members of other crop geometries read other
inputs, see :func:`contract_inputs`); member ``i`` > 0 stores its folds as ``member<i>_fold_<k>.pt``.

Input: float32 crops ``(B, 25, S, H, W)`` in [0, 1] (the cache's uint8 / 255) in TARGETS order, or ``(B, 50, S, H,
W)`` for a member trained with ``crop.second_view`` (the 25, then each target's second view; its contract's
``crop`` says so and its input's ``shape`` follows): one array when every member crops alike, else
``{input name: crops}``. Output: ``(B, 25, 3)`` probabilities in SEVERITIES
order: each member's mean over folds of each fold's softmax, blended over members and calibrated as the contract's
``calibration`` says (:class:`lumbar_ray.calibrate.Calibration`: convex weights per condition group, then an
optional temperature per group, ``softmax(log p / T)``; one member without temperatures: the fold mean itself).
The ``fold`` param selects one fold of every member (to reproduce the out-of-fold predictions).

A target without a crop is predicted by the training prior (the caller fills it in, see
:meth:`LoadedEnsemble.calibrated_prior`): the calibration, fitted on out-of-fold predictions where such targets
hold the prior, applies to it too.

Each version is tagged with the digest of the data it was trained on (``lumbar_ray.data_digest``, see
:mod:`lumbar_ray.data.lineage`). The alias (``tracking.alias``, "champion") moves to a new version when no version
holds it, or when the holder was trained on the same digest and the new version's CV score is lower than the
holder's ``cv_score`` tag (lower is better), so rerunning a worse config never demotes the best model. CV scores on
different data do not compare: a holder of another digest, or of none (registered before digests were recorded),
keeps the alias, and the :class:`RegisteredEnsemble` says why (move it by hand with
``MlflowClient.set_registered_model_alias`` when the new data is meant to replace the old).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from lumbar_ray.calibrate import Calibration, apply_group_temperatures
from lumbar_ray.config import Config, CropConfig, ModelConfig, TrackingConfig, cache_settings
from lumbar_ray.constants import SEVERITIES, TARGETS, series_slug
from lumbar_ray.errors import ModelNotFoundError
from lumbar_ray.models import build_model
from lumbar_ray.provenance import library_versions

logger = logging.getLogger(__name__)

CONTRACT_VERSION = 2
"""2: ``members``, ``inputs`` and ``calibration`` (a version-1 contract is one member, one input, no calibration)."""
CONTRACT_FILE = "contract.json"
MODEL_NAME_IN_RUN = "ensemble"
SCORE_TAG = "cv_score"
RUN_TAG = "mlflow_run_id"
CV_RUN_TAG = "lumbar_ray.run_id"
DATA_DIGEST_TAG = "lumbar_ray.data_digest"
"""Tag of a version (and of the CV's MLflow run): the digest of its training data, ``data-<16 hex>``."""
REGISTERED_TAG = "lumbar_ray.registered_version"
"""Tag of a CV's MLflow run: the model version its ensemble was registered as (so a rerun registers no duplicate)."""
DEFAULT_BATCH = 16
DEFAULT_INPUT = "crops"
"""The name of the (first) input: the crops of the first member's geometry."""
# What the served model imports: torch/timm (the networks), numpy, pydantic/PyYAML (lumbar_ray.config, which the
# model builders read) and scipy/pandas (lumbar_ray.calibrate and the metric it imports). Given explicitly: MLflow's
# inference of requirements is slow and needs the network.
PIP_REQUIREMENTS = ("torch", "timm", "numpy", "pydantic", "PyYAML", "scipy", "pandas")


def _fold_key(fold: int, member: int = 0) -> str:
    """Artifact name of a member's fold weights: ``fold_<k>`` (the first member), ``member<i>_fold_<k>``."""
    return f"fold_{int(fold)}" if member == 0 else f"member{int(member)}_fold_{int(fold)}"


def detector_key(description: str) -> str:
    """Artifact name of a series type's level detector, e.g. ``detector_sagittal_t1``."""
    return f"detector_{series_slug(description)}"


def _input_shape(crop: CropConfig | Mapping[str, Any]) -> list[int]:
    """``[batch, 25 * views, S, H, W]`` of the crops cut with ``crop`` (50 crops with ``crop.second_view``)."""
    crop = crop if isinstance(crop, CropConfig) else CropConfig(**crop)
    return [-1, len(TARGETS) * crop.views, crop.slices, crop.size, crop.size]


def contract_crop(crop: CropConfig) -> dict[str, Any]:
    """``crop`` as a contract records it: ``second_view`` only when on, so a one-view model's contract stays
    readable by the code of before the second view (its strict ``CropConfig`` refuses an unknown key)."""
    dumped = crop.model_dump(mode="json")
    if not crop.second_view:
        del dumped["second_view"]
    return dumped


def _members_and_inputs(members: Sequence[tuple[str, Config]]) -> tuple[list[dict], dict[str, dict]]:
    """Members' contract entries and the inputs they read: one per distinct crop geometry, in order of first use
    (``crops``, then ``crops_1``, ...)."""
    entries, inputs = [], {}
    for name, cfg in members:
        crop = contract_crop(cfg.crop)
        input_name = next((key for key, spec in inputs.items() if spec["crop"] == crop), None)
        if input_name is None:
            input_name = DEFAULT_INPUT if not inputs else f"{DEFAULT_INPUT}_{len(inputs)}"
            inputs[input_name] = {"crop": crop, "shape": _input_shape(cfg.crop)}
        entries.append({"name": str(name), "crop": crop, "model": cfg.model.model_dump(mode="json"),
                        "input": input_name})  # fmt: skip
    return entries, inputs


def ensemble_contract(
    cfg: Config,
    folds: list[int],
    prior: np.ndarray | None = None,
    detectors: list[str] | tuple[str, ...] = (),
    fold_priors: dict[int, np.ndarray] | None = None,
    members: Sequence[tuple[str, Config]] | None = None,
    calibration: Calibration | None = None,
    calibration_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a caller must know to feed the ensemble and read its output (saved as ``contract.json``).

    Args:
        cfg: the resolved config the folds were trained with (of an ensemble: the settings its members share,
            preprocessing and localisation; its ``crop``, ``model`` and ``input`` are the first member's).
        folds: the folds in the ensemble (every member's).
        prior: ``(25, 3)`` class prior of the training labels: the prediction of a target with no crop.
        detectors: the sagittal series types whose level detectors travel with the model.
        fold_priors: fold -> the prior of that fold's own training studies (what a single fold falls back on,
            so that its held-out studies are scored without their own labels leaking in).
        members: ``(name, config)`` of each member, in the order of its weights; None = ``cfg`` alone.
        calibration: the blend over members and the temperatures; None = the plain mean of the members.
        calibration_info: what to record beside it (the out-of-fold predictions it was fitted on, its scores).

    Raises:
        ValueError: a calibration whose weights do not have one weight per member.
    """
    members = list(members) if members is not None else [(cfg.train.run_id or "cv", cfg)]
    calibration = calibration if calibration is not None else Calibration.identity(len(members))
    if calibration.parts != len(members):
        raise ValueError(f"the calibration blends {calibration.parts} parts but there are {len(members)} members")
    entries, inputs = _members_and_inputs(members)
    first = members[0][1]
    return {
        "contract_version": CONTRACT_VERSION,
        "crop": contract_crop(first.crop),
        "model": first.model.model_dump(mode="json"),
        "preprocess": {
            **cache_settings(cfg.preprocess),
            "scaling": "cache uint8 / 255 -> float32 in [0, 1]",
        },
        "input": {
            "dtype": "float32",
            "shape": _input_shape(first.crop),
            "axes": ["batch", "target", "slice", "row", "column"],
            "views": first.crop.views,
            "range": [0.0, 1.0],
            "missing_target": "all-zero crop",
        },
        "inputs": inputs,
        "members": entries,
        "calibration": calibration.to_json() | dict(calibration_info or {}),
        "output": {"dtype": "float32", "shape": [-1, len(TARGETS), len(SEVERITIES)], "kind": "probabilities"},
        "classes": list(SEVERITIES),
        "targets": list(TARGETS),
        "prior": None if prior is None else np.asarray(prior, dtype=np.float64).tolist(),
        "fold_priors": {str(k): np.asarray(v, dtype=np.float64).tolist() for k, v in (fold_priors or {}).items()},
        "localize": {
            "config": cfg.localize.model_dump(mode="json"),
            "detectors": {description: detector_key(description) for description in detectors},
        },
        "folds": sorted(int(fold) for fold in folds),
        "versions": library_versions(("torch", "timm", "mlflow")),
    }


def contract_members(contract: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The members of a contract (``name``, ``crop``, ``model``, ``input``); a version-1 contract is one member."""
    if "members" in contract:
        return list(contract["members"])
    return [{"name": "cv", "crop": contract["crop"], "model": contract["model"], "input": DEFAULT_INPUT}]


def contract_inputs(contract: Mapping[str, Any]) -> dict[str, CropConfig]:
    """Input name -> the crop geometry its crops are cut with (one input for a model whose members crop alike)."""
    if "inputs" in contract:
        return {name: CropConfig(**spec["crop"]) for name, spec in contract["inputs"].items()}
    return {DEFAULT_INPUT: CropConfig(**contract["crop"])}


def contract_calibration(contract: Mapping[str, Any]) -> Calibration:
    """The blend and temperatures a model applies (a version-1 contract: the identity)."""
    if contract.get("calibration") is None:
        return Calibration.identity(len(contract_members(contract)))
    return Calibration.from_json(contract["calibration"])


def contract_prior(contract: Mapping[str, Any], fold: int | None = None) -> np.ndarray | None:
    """``(25, 3)`` prior of the training labels (of fold ``fold``'s training studies when given), or None for a
    model registered without it."""
    prior = contract.get("prior")
    if fold is not None:
        prior = contract.get("fold_priors", {}).get(str(int(fold)), None)
    if prior is None:
        return None
    prior = np.asarray(prior, dtype=np.float64)
    return prior / prior.sum(axis=-1, keepdims=True)  # exact row sums after the JSON round trip


def contract_calibrated_prior(contract: Mapping[str, Any], fold: int | None = None) -> np.ndarray | None:
    """What the model predicts for a target without a crop: :func:`contract_prior` with the model's temperatures (its
    calibration was fitted on out-of-fold predictions whose crop-less targets held the prior)."""
    prior = contract_prior(contract, fold)
    temperatures = contract_calibration(contract).temperatures
    if prior is None or temperatures is None:
        return prior
    return apply_group_temperatures(prior[None], temperatures)[0]


def signature_for(contract: dict[str, Any]) -> ModelSignature:
    """Tensor signature of the ensemble: float32 crops in (one tensor, or one named tensor per crop geometry),
    float32 probabilities out; ``fold`` and batch params."""
    shapes = {name: _input_shape(crop) for name, crop in contract_inputs(contract).items()}
    if len(shapes) == 1:
        inputs = Schema([TensorSpec(np.dtype(np.float32), tuple(next(iter(shapes.values()))))])
    else:
        inputs = Schema([TensorSpec(np.dtype(np.float32), tuple(shape), name=name) for name, shape in shapes.items()])
    outputs = Schema([TensorSpec(np.dtype(np.float32), tuple(contract["output"]["shape"]))])
    params = ParamSchema([ParamSpec("fold", "long", -1), ParamSpec("batch_size", "long", DEFAULT_BATCH)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def build_fold_model(
    member: Mapping[str, Any], state: dict[str, torch.Tensor], device: torch.device
) -> torch.nn.Module:
    """One fold's network from a member's ``model`` and ``crop`` configs (a contract entry of
    :func:`contract_members`, or a version-1 contract) and its weights, in eval mode on ``device``."""
    # The weights come from the state dict: never download pretrained encoder weights to overwrite them.
    model_cfg = ModelConfig(**{**member["model"], "pretrained": False})
    model = build_model(model_cfg, CropConfig(**member["crop"]))
    model.load_state_dict(state)
    return model.to(device).eval()


# MLflow 3 inspects predict's type hints when the class is created and warns that an ndarray hint is not
# validated; the tensor signature given at logging is what checks the inputs.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Any type hint", category=UserWarning)

    class FoldEnsemble(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc: each member's mean over folds of each fold's softmax (or one fold's, via the ``fold``
        param), blended over members and calibrated as the contract says."""

        def load_context(self, context: Any) -> None:
            """Rebuild every member's folds named in the contract from their weights artifacts."""
            self.contract = json.loads(Path(context.artifacts["contract"]).read_text())
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            detectors = self.contract.get("localize", {}).get("detectors", {})
            self.detector_paths = {description: context.artifacts[key] for description, key in detectors.items()}
            self.members = contract_members(self.contract)
            self.input_names = list(contract_inputs(self.contract))
            self.calibration = contract_calibration(self.contract)
            self.models: list[dict[int, torch.nn.Module]] = []
            for index, member in enumerate(self.members):
                folds = {}
                for fold in self.contract["folds"]:
                    path = context.artifacts[_fold_key(fold, index)]
                    state = torch.load(path, map_location="cpu", weights_only=True)
                    folds[int(fold)] = build_fold_model(member, state, self.device)
                self.models.append(folds)
            logger.info("fold ensemble loaded: %d member(s), folds %s on %s", len(self.members),
                        self.contract["folds"], self.device)  # fmt: skip

        def _selected(self, folds: dict[int, torch.nn.Module], fold: int) -> list[torch.nn.Module]:
            if fold < 0:
                return list(folds.values())
            if fold not in folds:
                raise ValueError(f"fold {fold} is not in this ensemble (folds {sorted(folds)})")
            return [folds[fold]]

        def _inputs(self, model_input: Any) -> dict[str, np.ndarray]:
            """Input name -> float32 crops: one array feeds the one input, a dict names each."""
            if isinstance(model_input, Mapping):
                missing = set(self.input_names) - set(model_input)
                if missing:
                    raise ValueError(f"crops missing for the inputs {sorted(missing)} (inputs: {self.input_names})")
                arrays = {name: model_input[name] for name in self.input_names}
            elif len(self.input_names) == 1:
                arrays = {self.input_names[0]: model_input}
            else:
                raise ValueError(f"this ensemble crops {len(self.input_names)} ways: give a dict of crops by input "
                                 f"name {self.input_names}")  # fmt: skip
            arrays = {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in arrays.items()}
            if len({len(array) for array in arrays.values()}) != 1:
                raise ValueError("every input must hold the same studies")
            return arrays

        def _member_probs(self, index: int, crops: np.ndarray, fold: int) -> np.ndarray:
            """One member's mean over its (selected) folds of each fold's softmax, float64."""
            x = torch.from_numpy(crops).to(self.device)
            models = self._selected(self.models[index], fold)
            probs = torch.stack([torch.softmax(model(x).float(), dim=-1) for model in models]).mean(dim=0)
            return probs.cpu().numpy().astype(np.float64)

        @property
        def inputs(self) -> dict[str, CropConfig]:
            """Input name -> the crop geometry its crops are cut with (:func:`contract_inputs`)."""
            return contract_inputs(self.contract)

        def calibrated_prior(self, fold: int | None = None) -> np.ndarray | None:
            """What the model predicts for a target without a crop (:func:`contract_calibrated_prior`)."""
            return contract_calibrated_prior(self.contract, fold)

        def predict_crops(
            self,
            model_input: np.ndarray | Mapping[str, np.ndarray],
            fold: int | None = None,
            batch_size: int = DEFAULT_BATCH,
        ) -> np.ndarray:
            """The crop-level entry: ``(B, 25 * views, S, H, W)`` float32 crops in [0, 1] (or a dict of them by input
            name) -> ``(B, 25, 3)`` float32 probabilities; ``fold`` None or -1 = the mean over folds.

            What the pyfunc signature of a crop-level model checks, and what the study-level model and the
            project's own batch inference call directly (their inputs are not crops).
            """
            batch = max(1, int(batch_size))
            inputs = self._inputs(model_input)
            studies = len(next(iter(inputs.values())))
            outputs = []
            with torch.inference_mode():
                for start in range(0, studies, batch):
                    parts = [self._member_probs(index, inputs[member["input"]][start : start + batch],
                                                -1 if fold is None else int(fold))
                             for index, member in enumerate(self.members)]  # fmt: skip
                    outputs.append(self.calibration.apply(parts).astype(np.float32))
            shape = (0, len(self.contract["targets"]), len(self.contract["classes"]))
            return np.concatenate(outputs) if outputs else np.zeros(shape, np.float32)

        def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
            """``(B, 25 * views, S, H, W)`` float32 crops (or a dict of them by input name) -> ``(B, 25, 3)`` float32.

            (Typed as an array: MLflow warns about a union hint; the signature is what checks the inputs.)

            Args:
                context: MLflow's context (unused once loaded).
                model_input: the crops (pyfunc has checked them against the signature).
                params: ``fold`` (-1 = mean over all folds) and ``batch_size`` (studies per forward pass).
            """
            params = params or {}
            return self.predict_crops(model_input, int(params.get("fold", -1)),
                                      int(params.get("batch_size", DEFAULT_BATCH)))  # fmt: skip


@dataclass(frozen=True)
class RegisteredEnsemble:
    """What :func:`log_and_register` did.

    Attributes:
        reason: why the alias moved or stayed, in words.
        data_digest: the digest of the version's training data (None: not known).
    """

    name: str
    version: int
    alias: str
    alias_moved: bool
    previous_alias_score: float | None
    model_uri: str
    reason: str = ""
    data_digest: str | None = None

    def __str__(self) -> str:
        held = "moved to it" if self.alias_moved else "stays"
        why = f": {self.reason}" if self.reason else ""
        return f"{self.name} v{self.version} ({self.model_uri}); alias {self.alias!r} {held}{why}"


States = dict[int, dict[str, torch.Tensor]]
"""fold -> state dict (CPU tensors): one member's weights."""


def _write_artifacts(members: list[States], contract: dict[str, Any], folder: Path, detectors: dict[str, Path]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = {"contract": str(folder / CONTRACT_FILE)}
    for description, path in detectors.items():
        artifacts[detector_key(description)] = str(path)
    (folder / CONTRACT_FILE).write_text(json.dumps(contract, indent=2))
    for index, states in enumerate(members):
        for fold, state in states.items():
            key = _fold_key(fold, index)
            torch.save({name: value.detach().cpu() for name, value in state.items()}, folder / f"{key}.pt")
            artifacts[key] = str(folder / f"{key}.pt")
    return artifacts


def _member_states(states: States | Sequence[States], contract: dict[str, Any]) -> list[States]:
    """Each member's fold states, checked against the contract's members and folds.

    Raises:
        ValueError: a different number of members, or a member whose folds are not the contract's.
    """
    members = [states] if isinstance(states, Mapping) else list(states)
    if len(members) != len(contract_members(contract)):
        raise ValueError(f"{len(members)} members' states for the {len(contract_members(contract))} the contract names")
    for index, member in enumerate(members):
        if sorted(int(fold) for fold in member) != contract["folds"]:
            raise ValueError(f"states of member {index} hold folds {sorted(member)} but the contract names "
                             f"{contract['folds']}")  # fmt: skip
    return members


def _alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such alias (or model) yet
        return None


@dataclass(frozen=True)
class AliasDecision:
    """Whether the alias moves to a new version and why; ``previous``: the holder's score (None: no holder or no
    score); ``compared``: False when the scores could not be compared (other data, or a holder without a score)."""

    move: bool
    previous: float | None
    reason: str
    compared: bool = True


def _holder_score(holder: ModelVersion) -> float | None:
    text = holder.tags.get(SCORE_TAG)
    return None if text is None else float(text)


def _should_move(holder: ModelVersion | None, cv_score: float, data_digest: str | None) -> AliasDecision:
    """Whether the alias moves from ``holder`` to a version scoring ``cv_score`` trained on ``data_digest``: no
    holder, or the same data digest and a lower score (see the module docstring)."""
    if holder is None:
        return AliasDecision(True, None, "no version held it")
    previous, held = _holder_score(holder), holder.tags.get(DATA_DIGEST_TAG)
    if held is None:
        why = (f"holder v{holder.version} has no {DATA_DIGEST_TAG} tag (registered before digests were recorded), "
               "so it counts as trained on other data")  # fmt: skip
    elif data_digest is None:
        why = f"this version's training data is unknown (no data digest), holder v{holder.version}'s is {held}"
    elif held != data_digest:
        why = f"holder v{holder.version} was trained on other data ({held}; this version on {data_digest})"
    elif previous is None:
        return AliasDecision(False, None, f"holder v{holder.version} has no {SCORE_TAG} tag", compared=False)
    elif cv_score < previous:
        return AliasDecision(True, previous, f"cv {cv_score:.5f} beats holder v{holder.version}'s {previous:.5f} "
                             f"on the same data ({held})")  # fmt: skip
    else:
        return AliasDecision(False, previous, f"cv {cv_score:.5f} does not beat holder v{holder.version}'s "
                             f"{previous:.5f} on the same data ({held})")  # fmt: skip
    return AliasDecision(False, previous, f"{why}: CV scores on different data are not compared; move the alias by "
                         "hand if this version should take it", compared=False)  # fmt: skip


@dataclass(frozen=True)
class Packaging:
    """How a version is packaged for MLflow: the pyfunc class, its signature and requirements.

    :func:`crop_packaging` (the default) is the crop-level :class:`FoldEnsemble`; the study-level model
    (:mod:`lumbar_ray.inference.model`, DICOM in, submission rows out) brings its own.

    Attributes:
        python_model: a :class:`FoldEnsemble` (or subclass) instance.
        signature: the model's signature.
        pip_requirements: what the served model needs installed.
        input_example: saved with the model (None = none).
    """

    python_model: FoldEnsemble
    signature: ModelSignature
    pip_requirements: tuple[str, ...]
    input_example: Any = None


def crop_packaging(contract: dict[str, Any]) -> Packaging:
    """The crop-level packaging: :class:`FoldEnsemble` with its tensor signature (:func:`signature_for`)."""
    return Packaging(FoldEnsemble(), signature_for(contract), PIP_REQUIREMENTS)


def _save_model(folder: Path, states: list[States], contract: dict[str, Any], detectors: dict[str, Path],
                packaging: Packaging) -> Path:  # fmt: skip
    """Write the pyfunc model (weights, contract, detectors, lumbar_ray's code) to ``folder/<name in run>``."""
    artifacts = _write_artifacts(states, contract, folder / "artifacts", detectors)
    model_dir = folder / MODEL_NAME_IN_RUN
    mlflow.pyfunc.save_model(
        path=str(model_dir),
        python_model=packaging.python_model,
        artifacts=artifacts,
        code_paths=[str(Path(__file__).resolve().parent)],
        signature=packaging.signature,
        input_example=packaging.input_example,
        pip_requirements=list(packaging.pip_requirements),
        metadata={"contract": contract},
    )
    return model_dir


def _create_version(client: MlflowClient, name: str, source: str, run_id: str, tags: dict[str, str]) -> ModelVersion:
    """A new version of registered model ``name`` (created on first use) whose files are at ``source``."""
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, source, run_id=run_id, tags=tags)


def free_artifact_path(client: MlflowClient, run_id: str, base: str) -> str:
    """``base``, or ``base_2``, ``base_3``... when the run holds it already: a model logged into a run that holds
    one (the same CV registered again, e.g. with another localiser) must never overwrite the files of a version
    registered from it."""
    taken = {Path(item.path).name for item in client.list_artifacts(run_id)}
    if base not in taken:
        return base
    return next(f"{base}_{k}" for k in range(2, len(taken) + 3) if f"{base}_{k}" not in taken)


def log_and_register(
    states: States | Sequence[States],
    contract: dict[str, Any],
    tracking_cfg: TrackingConfig,
    uri: str,
    parent_run_id: str,
    cv_score: float,
    detectors: dict[str, Path] | None = None,
    packaging: Packaging | None = None,
    data_digest: str | None = None,
) -> RegisteredEnsemble:
    """Log the fold ensemble into the CV's parent run, register it and promote the alias if it scores better on
    the same training data (see the module docstring).

    Only an explicit :class:`~mlflow.MlflowClient` is used (the model is saved locally, its files logged as the
    run's ``ensemble`` artifacts and registered from there), so MLflow's global tracking URI and active run are
    never touched.

    Args:
        states: fold -> state dict (CPU tensors) of that fold's best epoch; of an ensemble, one such dict per
            member, in the contract's order.
        contract: :func:`ensemble_contract` of the run; its ``folds`` must be the keys of every member's states.
        tracking_cfg: ``model_name`` and ``alias``.
        uri: the tracking (and registry) URI; it must be database-backed (SQLite, a server).
        parent_run_id: the MLflow run the model is logged into.
        cv_score: the ensemble's out-of-fold CV score (lower is better), tagged on the version.
        detectors: series type -> level detector weights to ship with the model (named in the contract).
        packaging: the pyfunc class and signature (None = the crop-level :func:`crop_packaging`).
        data_digest: the digest of the training data (:func:`lumbar_ray.data.lineage.data_digest`), tagged on the
            version; None: unknown (no tag; the alias then moves to it only when no version holds it).

    Returns:
        The registered version, whether the alias moved to it and why.
    """
    states = _member_states(states, contract)
    detectors = detectors or {}
    if sorted(detectors) != sorted(contract.get("localize", {}).get("detectors", {})):
        raise ValueError(f"detectors {sorted(detectors)} differ from the contract's")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name, alias = tracking_cfg.model_name, tracking_cfg.alias
    run = client.get_run(parent_run_id)
    tags = {SCORE_TAG: repr(float(cv_score)), RUN_TAG: parent_run_id, CV_RUN_TAG: run.data.tags.get(CV_RUN_TAG, "")}
    tags |= {DATA_DIGEST_TAG: data_digest} if data_digest else {}
    in_run = free_artifact_path(client, parent_run_id, MODEL_NAME_IN_RUN)
    with tempfile.TemporaryDirectory() as folder:
        packaging = packaging if packaging is not None else crop_packaging(contract)
        model_dir = _save_model(Path(folder), states, contract, detectors, packaging)
        client.log_artifacts(parent_run_id, str(model_dir), in_run)
    source = f"{run.info.artifact_uri.rstrip('/')}/{in_run}"
    version = _create_version(client, name, source, parent_run_id, tags)
    holder = _alias_holder(client, name, alias)
    decision = _should_move(holder, float(cv_score), data_digest)
    if decision.move:
        client.set_registered_model_alias(name, alias, version.version)
    _log_decision(name, int(version.version), alias, decision, holder)
    return RegisteredEnsemble(name, int(version.version), alias, decision.move, decision.previous,
                              f"models:/{name}/{version.version}", decision.reason, data_digest)  # fmt: skip


def _log_decision(name: str, version: int, alias: str, decision: AliasDecision, holder: ModelVersion | None) -> None:
    """One line: info when the scores decided, a warning when the data kept them from being compared."""
    where = "moved to it" if decision.move or holder is None else f"stays on v{holder.version}"
    log = logger.info if decision.compared else logger.warning
    log("registered %s v%s; alias %r %s: %s", name, version, alias, where, decision.reason)


def registered_version(tracking_uri: str, run_id: str) -> str | None:
    """The model version a CV's MLflow run registered its ensemble as (its :data:`REGISTERED_TAG`), or None."""
    return MlflowClient(tracking_uri).get_run(run_id).data.tags.get(REGISTERED_TAG)


def mark_registered(tracking_uri: str, run_id: str, version: int) -> None:
    """Record on a CV's MLflow run that its ensemble is registered as ``version`` (a rerun registers no twin)."""
    MlflowClient(tracking_uri).set_tag(run_id, REGISTERED_TAG, str(version))


def model_source(model_uri: str, tracking_uri: str) -> str:
    """Where the files of a model live: ``models:/<name>/<version>`` (``latest`` too) and ``models:/<name>@<alias>``
    resolved through the registry; any other URI (``runs:/<id>/ensemble``, a logged model ``models:/m-<id>``, a
    folder) as it is, for MLflow to resolve.

    Raises:
        ModelNotFoundError: an unknown model name, version or alias (the message says which).
    """
    path = model_uri.removeprefix("models:/")
    if path == model_uri or ("@" not in path and "/" not in path):
        return model_uri
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, at, alias = path.partition("@")
    version = None if at else name.rpartition("/")[2]
    name = name if at else name.rpartition("/")[0]
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ModelNotFoundError(f"{model_uri}: no registered model named {name!r} in {tracking_uri}") from None
    if version == "latest":
        versions = client.search_model_versions(f"name = {name!r}")
        version = str(max((int(v.version) for v in versions), default=0)) if versions else "latest"
    try:
        version = client.get_model_version_by_alias(name, alias).version if at else version
        return client.get_model_version_download_uri(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if at else f"version {version!r}"
        raise ModelNotFoundError(f"{model_uri}: registered model {name!r} has no {what}") from None


def read_contract(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """The data contract of a logged or registered ensemble, from its MLmodel file only (no weights downloaded).

    Raises:
        ModelNotFoundError: an unknown model, version or alias, or a model that carries no lumbar_ray contract.
    """
    source = model_source(model_uri, tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(f"{source.rstrip('/')}/MLmodel", dst_path=folder,
                                                   tracking_uri=tracking_uri)  # fmt: skip
        metadata = yaml.safe_load(Path(path).read_text()).get("metadata") or {}
    if not metadata.get("contract"):
        raise ModelNotFoundError(f"{model_uri} is not a lumbar_ray fold ensemble (no contract in its metadata)")
    return metadata["contract"]


def describe_model(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """What a served model is: ``name``, ``version``, ``alias`` (the one it was asked by, or None), ``uri``,
    ``cv_score``, ``data_digest``, ``run_id`` (the CV's MLflow run) and ``contract``; the registry fields None for a
    URI outside the registry (``runs:/...``, a folder).

    Raises:
        ModelNotFoundError: an unknown model, version or alias.
    """
    contract = read_contract(model_uri, tracking_uri)
    info: dict[str, Any] = {"name": None, "version": None, "alias": None, "uri": model_uri, "cv_score": None,
                            "data_digest": None, "run_id": None, "contract": contract}  # fmt: skip
    path = model_uri.removeprefix("models:/")
    if path == model_uri or ("@" not in path and "/" not in path):
        return info
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, at, alias = path.partition("@")
    if at:
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = name.rpartition("/")
        version = client.get_model_version(name, model_source_version(client, name, number))
    tags = dict(version.tags)
    score = tags.get(SCORE_TAG)
    return info | {"name": name, "version": int(version.version), "alias": alias or None,
                   "cv_score": None if score is None else float(score), "data_digest": tags.get(DATA_DIGEST_TAG),
                   "run_id": tags.get(RUN_TAG)}  # fmt: skip


def model_source_version(client: MlflowClient, name: str, number: str) -> str:
    """A version number as given (``latest``: the highest)."""
    if number != "latest":
        return number
    return str(max(int(v.version) for v in client.search_model_versions(f"name = {name!r}")))


def pinned_model_uri(info: Mapping[str, Any]) -> str:
    """``models:/<name>/<version>`` of a :func:`describe_model` (an alias resolved once), else its URI as given."""
    return f"models:/{info['name']}/{info['version']}" if info.get("name") else str(info["uri"])


@dataclass
class LoadedEnsemble:
    """A loaded registered ensemble: its data contract and a crops -> probabilities call."""

    model: Any
    contract: dict[str, Any]

    @property
    def detector_paths(self) -> dict[str, str]:
        """Series type -> local path of its level detector's weights (empty for a model without detectors)."""
        return dict(getattr(self.model.unwrap_python_model(), "detector_paths", {}))

    def prior(self, fold: int | None = None) -> np.ndarray | None:
        """:func:`contract_prior` of this model."""
        return contract_prior(self.contract, fold)

    @property
    def calibration(self) -> Calibration:
        """The blend over members and the temperatures the model applies (:func:`contract_calibration`)."""
        return contract_calibration(self.contract)

    @property
    def inputs(self) -> dict[str, CropConfig]:
        """Input name -> crop geometry: cut each study's crops once per input (:func:`contract_inputs`)."""
        return contract_inputs(self.contract)

    def calibrated_prior(self, fold: int | None = None) -> np.ndarray | None:
        """:func:`contract_calibrated_prior` of this model."""
        return contract_calibrated_prior(self.contract, fold)

    def predict_crops(
        self, crops: np.ndarray | Mapping[str, np.ndarray], fold: int | None = None, batch_size: int = DEFAULT_BATCH
    ) -> np.ndarray:
        """``(B, 25 * views, S, H, W)`` crops in [0, 1] (cast to float32) -> ``(B, 25, 3)`` probabilities.

        Args:
            crops: the crops, as described by ``contract["input"]``; or input name -> crops (:attr:`inputs`).
            fold: one fold only (each member's out-of-fold model), or None for the mean over folds.
            batch_size: studies per forward pass.
        """
        params = {"fold": -1 if fold is None else int(fold), "batch_size": int(batch_size)}
        if isinstance(crops, Mapping):
            names = list(self.inputs)
            arrays = {name: np.asarray(crops[name], dtype=np.float32) for name in names}
            model_input = arrays[names[0]] if len(names) == 1 else arrays
        else:
            model_input = np.asarray(crops, dtype=np.float32)
        # The crop-level entry of the python model itself: a study-level model's signature takes DICOM, not crops.
        return np.asarray(self.model.unwrap_python_model().predict_crops(model_input, **params))


def load_ensemble(model_uri: str, tracking_uri: str) -> LoadedEnsemble:
    """Load a logged or registered ensemble, e.g. ``models:/lumbar_ray_ensemble@champion``.

    Args:
        model_uri: any MLflow model URI of a :class:`FoldEnsemble`.
        tracking_uri: the store (and registry) holding it.
    """
    source = model_source(model_uri, tracking_uri)
    local = mlflow.artifacts.download_artifacts(source, tracking_uri=tracking_uri)
    model = mlflow.pyfunc.load_model(local)
    contract = model.unwrap_python_model().contract
    logger.info("loaded %s: %d member(s), folds %s", model_uri, len(contract_members(contract)), contract["folds"])
    return LoadedEnsemble(model, contract)
