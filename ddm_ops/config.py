"""Typed, validated parameters: one model per params.yaml block, errors that name key, value and what is allowed."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)


class ParamsError(ValueError):
    """Bad parameters: the message names the key, the value given and what is allowed."""


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


BUILTIN_DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "tinyimagenet")
BUILTIN_MODELS = ("convnet", "mlp", "resnet18", "alexnet", "vit")
DOTTED_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def import_dotted(key: str, spec: str) -> Any:
    """The object a dotted path `module:name` from params names (the only way user code is run)."""
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ParamsError(
            f"{key} = {spec!r}: cannot load {attr} from {module} ({type(err).__name__}: {err}); "
            "the module must be importable from the project folder"
        ) from None


def _builtin_or_dotted(value: str, builtin: tuple[str, ...], example: str) -> str:
    if value in builtin or DOTTED_PATH.match(value):
        return value
    raise ValueError(f"allowed: {', '.join(repr(b) for b in builtin)}, or a dotted path like {example!r}")


class BaseParams(_Block):
    seed: int = Field(0, description="Seed of model initialisation, batch order and clustering.")
    device: str = Field("cpu", description="auto | cpu | cuda | cuda:N")

    @field_validator("device")
    @classmethod
    def _device_known(cls, d: str) -> str:
        if d not in ("auto", "cpu", "cuda") and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ValueError("allowed: auto, cpu, cuda, cuda:N")
        return d


class SubsetParams(_Block):
    train: PositiveInt | None = Field(None, description="Stratified number of training samples kept.")
    test: PositiveInt | None = Field(None, description="Stratified number of test samples kept.")
    seed: int = Field(0, description="Seed of the stratified subset.")


class LabelNoiseParams(_Block):
    fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of the training samples whose label is flipped.")
    mode: Literal["uniform", "clustered"] = Field(
        "uniform",
        description="uniform: samples drawn at random, each given another class at random; clustered: whole "
        "pixel-space k-means groups (5 per class) relabelled, each group to one other class",
    )
    seed: int = Field(0, description="Seed of which labels are flipped and to what.")


class DataParams(_Block):
    name: str = Field(
        "digits",
        description="digits (ships with scikit-learn), fashion-mnist, mnist, cifar10, cifar100, tinyimagenet, "
        "or a loader of your own as module:function",
    )
    root: str = Field("data", description="Folder where file-based datasets are looked for.")
    download: bool = Field(False, description="Let torchvision fetch mnist / cifar10 / cifar100 into root.")
    test_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="Share of the data in the fixed test split (digits: no split of its own)."
    )
    subset: SubsetParams | None = Field(None, description="Keep a stratified subset (small CPU runs).")
    label_noise: LabelNoiseParams | None = Field(
        None, description="Corrupt training labels to evaluate data-quality attribution (test labels stay clean)."
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return _builtin_or_dotted(name, BUILTIN_DATASETS, "mypkg.data:load")


class ModelParams(_Block):
    name: str = Field(
        "convnet", description="convnet, mlp, resnet18, alexnet, vit, or a model class of your own as module:Class"
    )
    width: PositiveInt = Field(
        32,
        description="convnet: channels per block; mlp: hidden units; alexnet: channels of its first conv; "
        "vit: embedding size (resnet18 keeps torchvision's widths)",
    )
    depth: PositiveInt = Field(
        2, description="convnet: conv-norm-relu-pool blocks; mlp: hidden layers; vit: transformer blocks"
    )
    norm: Literal["instancenorm", "batchnorm", "none"] = Field(
        "instancenorm", description="Normalisation layers of convnet and resnet18."
    )
    patch_size: PositiveInt = Field(4, description="vit: patch size (must divide the image size).")
    heads: PositiveInt = Field(4, description="vit: attention heads (must divide width).")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return _builtin_or_dotted(name, BUILTIN_MODELS, "mypkg.models:Net")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelParams:
        if self.name == "vit" and self.width % self.heads:
            raise ValueError(f"model.heads = {self.heads} must divide model.width = {self.width} for vit")
        return self


class TrainParams(_Block):
    epochs: PositiveInt = Field(30, description="Training epochs of the target model (and of every retraining).")
    batch_size: PositiveInt = Field(64, description="SGD batch size; batches come from a seeded shuffle.")
    lr: PositiveFloat = Field(0.05, description="SGD learning rate (its start, with lr_schedule cosine).")
    momentum: float = Field(0.0, description="Must be 0: the trajectory's cluster gradients assume plain SGD.")
    weight_decay: float = Field(0.0, description="Must be 0: the trajectory's cluster gradients assume plain SGD.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant, or cosine: lr decays per epoch along a half cosine towards 0."
    )
    checkpoint_every: PositiveInt = Field(2, description="Epochs between saved trajectory checkpoints.")

    @field_validator("momentum", "weight_decay")
    @classmethod
    def _plain_sgd(cls, value: float) -> float:
        if value != 0:
            raise ValueError(
                "allowed: 0 (the cluster gradients along the trajectory, G_t = (epochs/batch) Σ ∇loss_i, and the "
                "curvature assume plain SGD; momentum and weight decay would make them the wrong update)"
            )
        return value


class RecordTrajectoryParams(_Block):
    features: Literal["penultimate", "pixels"] = Field(
        "penultimate", description="Train-set features used for clustering."
    )


class ClusterParams(_Block):
    k_per_class: PositiveInt = Field(5, description="k-means clusters within each class.")


class DistillParams(_Block):
    ipc: PositiveInt = Field(8, description="Synthetic images per cluster.")
    iterations: PositiveInt = Field(100, description="Gradient-matching iterations (Adam steps) per cluster.")
    lr: PositiveFloat = Field(0.05, description="Adam learning rate of the synthetic images.")
    labels: Literal["learned", "solved"] = Field(
        "learned",
        description="learned: softmax logits learned by Adam with the images (label_lr); solved: the soft labels "
        "minimising the whitened matching loss, in closed form (the synset's gradient is linear in them; least "
        "squares in ipc·classes unknowns), on the initial images and again on the final ones (metric whitened; "
        "better on digits with 20 iterations, worse on Fashion-MNIST: docs/method.md)",
    )
    label_lr: float = Field(
        0.05, ge=0.0, description="labels learned: Adam learning rate of the soft-label logits; 0 keeps hard labels."
    )
    pairing: Literal["checkpoint", "mirrored", "lifo"] = Field(
        "checkpoint",
        description="checkpoint: the synset's gradient at each of the `checkpoints` checkpoints is matched to "
        "the cluster's gradient at that same checkpoint, where the removal uses it; mirrored (the paper's formula) "
        "and lifo: the synset walks the whole trajectory backwards from θ_T, paired with segment t (mirrored) or "
        "T-1-t (lifo)",
    )
    checkpoints: PositiveInt | Literal["all"] = Field(
        "all",
        description="pairing checkpoint, and perturb.update ekfac: this many trajectory checkpoints, spread evenly "
        "from θ_0 to θ_T (both included; 1: θ_T alone), where synsets are matched and removals made; all, or more "
        "than are saved: every saved checkpoint",
    )
    direction: Literal["forward", "reverse"] = Field(
        "forward",
        description="forward: the synset's gradient imitates the cluster's, and removal steps against it; reverse: "
        "it is matched to minus the cluster's (the paper), and removal descends it. At one checkpoint the two give "
        "the same removal, and +G is far easier to match (cosine 0.9 vs 0.03-0.4 on digits)",
    )
    metric: Literal["layerwise", "whitened"] = Field(
        "whitened",
        description="How the synset's gradient is compared with the cluster's. layerwise: the paper's layer-wise "
        "cosine plus magnitude_weight times the log-norm term; whitened: both whitened by the training loss's "
        "curvature at the checkpoint, (F + λ)^-1/2 g (the curvature stage's EK-FAC factors, λ from perturb.damping), "
        "and their relative squared distance minimised, the error the Newton removal's scores inherit (pairing "
        "checkpoint only)",
    )
    magnitude_weight: float = Field(
        1.0, ge=0.0, description="metric layerwise: weight of the gradient-norm term next to the cosine term."
    )
    batchnorm: Literal["eval", "train"] = Field(
        "eval",
        description="BatchNorm during matching and removal: eval uses each checkpoint's running statistics, "
        "train the statistics of the batch (the cluster's members, the synset's images)",
    )

    @model_validator(mode="after")
    def _solved_labels_need_whitened(self) -> DistillParams:
        if self.labels == "solved" and self.metric != "whitened":
            raise ValueError(
                f"distill.labels = 'solved' needs distill.metric = 'whitened' (got {self.metric!r}): the labels solve "
                "the whitened matching loss; use labels learned"
            )
        return self


class ExecutionParams(_Block):
    runner: Literal["serial", "thread", "process", "dask", "ray"] = Field(
        "thread", description="Task runner of the per-cluster fan-out (distill, ground_truth)."
    )
    workers: PositiveInt = Field(2, description="Parallel workers (of a local Dask/Ray cluster when no address).")
    address: str | None = Field(None, description="An existing Dask scheduler (tcp://host:8786) or Ray cluster.")
    threads_per_worker: PositiveInt = Field(
        1, description="Torch threads of each per-cluster task; fixed so results do not depend on the runner."
    )
    items_per_task: PositiveInt | Literal["auto"] = Field(
        "auto", description="Clusters (or retrainings) per Prefect task; auto: about four tasks per worker."
    )
    retries: int = Field(1, ge=0, description="Prefect retries of a failed per-cluster task.")
    retry_delay_seconds: float = Field(0.0, ge=0.0, description="Wait before a retry.")

    @model_validator(mode="after")
    def _address_needs_cluster_runner(self) -> ExecutionParams:
        if self.address is not None and self.runner not in ("dask", "ray"):
            raise ValueError(f"execution.address is set but execution.runner = {self.runner!r}; use dask or ray")
        return self


class GroundTruthParams(_Block):
    enabled: bool = Field(False, description="Retrain without each cluster and without random halves (slow).")
    subsets: PositiveInt = Field(20, description="Random within-class halves of the clusters (group-LDS).")
    keep_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="Share of each class's clusters a subset keeps.")
    seeds: PositiveInt = Field(3, description="Seeds of the resampled flavour (fresh batch order and init).")
    calibration_clusters: int = Field(
        3, ge=0, description="Retrained clusters used to fit removal step sizes, then left out of the evaluation."
    )


class PerturbParams(_Block):
    update: Literal["ekfac", "sgd"] = Field(
        "ekfac",
        description="ekfac: at each matched checkpoint θ_t of the first perturb.span of training, one Newton step "
        "θ_t - s·H_t^-1·∇L(θ_t; synset) with H_t the EK-FAC curvature of the training loss (stage curvature), "
        "combined as perturb.combine says; sgd: the paper's n_u plain SGD steps on the synset from θ_T",
    )
    combine: Literal["outputs", "steps"] = Field(
        "outputs",
        description="update ekfac: outputs averages the output changes of one removed model per checkpoint (a "
        "forward pass per checkpoint and cluster); steps removes once, from θ_T, by the mean of the checkpoints' "
        "Newton steps (one forward pass per cluster: about as many times less online work as there are "
        "checkpoints, at a measured loss of quality, docs/method.md)",
    )
    n_u: PositiveInt = Field(3, description="update sgd: SGD steps on the synset that remove one cluster.")
    step_size: PositiveFloat | Literal["auto"] = Field(
        0.02,
        description="s. ekfac: in units of the influence-function step (1 removes the cluster's share of the mean "
        "training loss to first order, for synsets matched with pairing checkpoint; 0.02 calibrated on digits "
        "K=50); sgd: the learning rate of each step (2e-4 calibrated on digits K=50); auto fits it on the "
        "calibration clusters",
    )
    span: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="update ekfac: the removal uses the matched checkpoints (distill.checkpoints) of the first span "
        "of training, θ_0 to θ_{round(span·T)}, and leaves the later ones out (1: all of them). 0.2 ranks subsets "
        "of clusters better on digits K=50 (two seeds) and Fashion-MNIST K=100 (two subsets), worse on digits K=20, "
        "and single clusters worse on all five (docs/method.md)",
    )
    curvature: Literal["fisher", "margin"] = Field(
        "fisher",
        description="update ekfac (and distill.metric whitened): the curvature H_t, as EK-FAC factors at each "
        "matched checkpoint. fisher: the true Fisher of the training loss (labels sampled from the model, as "
        "Kronfluence); margin: the Gauss–Newton matrix of the training samples' log-odds log(p/(1-p)) of their "
        "label (TRAK's kernel), which confidently fitted samples still weigh in (docs/method.md)",
    )
    damping: PositiveFloat = Field(
        0.01,
        description="update ekfac: added to every curvature eigenvalue, as a fraction of their mean (0.1 is "
        "Kronfluence's heuristic)",
    )
    lengths: Literal["kernel", "curvature"] = Field(
        "kernel",
        description="update ekfac with curvature fisher: each cluster's step length. kernel: the Fisher Newton step "
        "of each cluster rescaled by c_k, how much more TRAK's kernel's Newton step (curvature margin) changes the "
        "margins of 512 training images than it does (the cluster's own members left out; c normalized to median "
        "1): the Fisher's directions with the kernel's magnitudes, better subsets on all five benchmark configs "
        "(docs/method.md); curvature: the Newton step's own, one step size s for all clusters",
    )


class AttributeParams(_Block):
    objectives: tuple[Literal["margin", "loss", "probability"], ...] = Field(
        ("margin", "loss", "probability"),
        min_length=1,
        description="Outputs o_j whose drop is the score (positive = the cluster helps); the first is the headline.",
    )


BASELINES = (
    "ddm_paper",
    "first_order",
    "gradient_ascent",
    "forward_matching",
    "tracin",
    "influence",
    "trak",
    "trak_ensemble",
    "ekfac",
    "ekfac_ensemble",
)
CALIBRATED = ("ddm_paper", "gradient_ascent", "forward_matching")  # their removal step is fitted on retrainings


class BaselinesParams(_Block):
    enabled: bool = Field(False, description="Compute the reference methods next to DDM.")
    methods: tuple[Literal[BASELINES], ...] = Field(  # type: ignore[valid-type]
        ("first_order", "gradient_ascent"),
        description="Methods next to DDM (class_indicator and input_similarity always): ddm_paper (the paper's "
        "DDM: mirrored pairing, plain SGD removal, step calibrated), first_order, gradient_ascent, forward_matching "
        "(DDM's predecessor), and from the peers extra tracin, influence, trak (one model), trak_ensemble, ekfac, "
        "ekfac_ensemble",
    )
    gradient_ascent_steps: PositiveInt = Field(3, description="Ascent steps on the real cluster from θ_T.")
    trak_models: int = Field(5, ge=2, description="trak_ensemble: the last this many checkpoints of the trajectory.")
    ekfac_models: int = Field(
        5, ge=2, description="ekfac_ensemble: EK-FAC at the last this many checkpoints, scores averaged."
    )
    influence_damping: float = Field(
        0.0, ge=0.0, description="influence (Arnoldi): damping added to the Hessian (dattri's default 0)."
    )


class DataQualityParams(_Block):
    enabled: bool = Field(
        False, description="Retrain without the least useful data by DDM's ranking (the removal curve)."
    )
    removal_percent: tuple[float, ...] = Field(
        (0.0, 1.0, 10.0, 20.0, 50.0), description="Shares (%) of the training data removed, least useful first."
    )
    seeds: PositiveInt = Field(2, description="Retraining seeds per point of the curve (fresh batch order and init).")

    @field_validator("removal_percent")
    @classmethod
    def _percent(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 <= v < 100 for v in values):
            raise ValueError("every share must be in [0, 100)")
        return values


class ReportParams(_Block):
    n_examples: PositiveInt = Field(4, description="Test samples shown with their most helpful and harmful clusters.")
    tracking_uri: str | None = Field(None, description="MLflow store; default sqlite:///<project>/mlflow.db.")
    experiment: str = Field("ddm", description="MLflow experiment that holds one run per pipeline run.")
    membership_references: NonNegativeInt = Field(
        8,
        description="Reference models of the privacy audit's membership attack, each trained on the training images "
        "no synset starts from (about one target training each); 0 skips the attack, at least 2 otherwise.",
    )

    @field_validator("membership_references")
    @classmethod
    def _references(cls, value: int) -> int:
        if value == 1:
            raise ValueError("0 (no attack) or at least 2 (their spread is the attack's unit)")
        return value


class Params(_Block):
    base: BaseParams = Field(BaseParams(), description="Shared by every stage: seed and device.")
    data: DataParams = Field(
        DataParams(),
        description="The dataset, its split, and an optional stratified subset or label noise.",
    )
    model: ModelParams = Field(ModelParams(), description="The target architecture.")
    train: TrainParams = Field(
        TrainParams(), description="How the target is trained with plain SGD and how often its trajectory is saved."
    )
    record_trajectory: RecordTrajectoryParams = Field(
        RecordTrajectoryParams(), description="What the trajectory stage records for clustering."
    )
    cluster: ClusterParams = Field(
        ClusterParams(), description="How the training set is split into clusters (k-means within each class)."
    )
    distill: DistillParams = Field(
        DistillParams(), description="How each cluster is distilled into its synset by gradient matching."
    )
    execution: ExecutionParams = Field(
        ExecutionParams(),
        description="How the per-cluster work is spread (not a DVC dependency, except threads_per_worker).",
    )
    ground_truth: GroundTruthParams = Field(
        GroundTruthParams(), description="The evaluation branch: retraining without clusters (off by default; slow)."
    )
    perturb: PerturbParams = Field(
        PerturbParams(), description="How a cluster is removed from the trained model using its synset."
    )
    attribute: AttributeParams = Field(AttributeParams(), description="Which outputs the attribution scores.")
    baselines: BaselinesParams = Field(
        BaselinesParams(), description="Reference methods computed next to DDM (needs ground_truth for some)."
    )
    data_quality: DataQualityParams = Field(
        DataQualityParams(),
        description="The removal curve: retraining without the least useful data by DDM's ranking (slow).",
    )
    report: ReportParams = Field(ReportParams(), description="The report, the privacy audit and MLflow tracking.")

    @model_validator(mode="after")
    def _calibration_needs_ground_truth(self) -> Params:
        gt = self.ground_truth
        if self.perturb.step_size == "auto" and not (gt.enabled and gt.calibration_clusters > 0):
            raise ValueError(
                "perturb.step_size = 'auto' needs ground_truth.enabled: true and ground_truth.calibration_clusters > 0"
            )
        calibrated = sorted(set(CALIBRATED) & set(self.baselines.methods))
        if self.baselines.enabled and calibrated and not (gt.enabled and gt.calibration_clusters > 0):
            raise ValueError(
                f"baselines.methods = {calibrated} needs ground_truth.enabled: true and "
                "ground_truth.calibration_clusters > 0 (their removal step is calibrated like DDM's)"
            )
        if self.distill.metric == "whitened" and self.distill.pairing != "checkpoint":
            raise ValueError(
                f"distill.metric = 'whitened' needs distill.pairing = 'checkpoint' (got {self.distill.pairing!r}): the "
                "curvature is fitted at the checkpoints the synset is matched at; use metric layerwise"
            )
        if self.perturb.update == "ekfac" and self.perturb.span < 1 and self.distill.checkpoints == 1:
            raise ValueError(
                f"perturb.span = {self.perturb.span} needs distill.checkpoints of at least 2 (1 matches at θ_T alone, "
                "which the first span of training leaves out); set perturb.span: 1 or more checkpoints"
            )
        if self.data_quality.enabled and "loss" not in self.attribute.objectives:
            raise ValueError(
                "data_quality.enabled = true needs 'loss' in attribute.objectives (clusters are ranked by it)"
            )
        return self


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if not key:  # a rule across blocks: the message names the keys
            lines.append(f"{source}: {msg}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key!r}")
        else:
            lines.append(f"{source}: {key} = {value!r}: {msg}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raise ParamsError naming each bad key, its value and what is allowed."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    with path.open() as fh:
        raw = yaml.safe_load(fh)
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of blocks, got {type(raw).__name__}")
    return parse_params(raw, str(path))
