"""Off-the-shelf token reduction sweep (the library of ``tools/offshelf.py``).

One trained ViTDet detector (any yacs ``.yaml`` or LazyConfig ``.py`` config whose model has a
Detectron2 ``ViT`` at ``model.backbone.net``) is evaluated stock and with each clustering method
at each keep rate, with no fine-tuning. Each (method, keep rate) cell gets:

- the config's own evaluator (COCOEvaluator: box and mask AP), on the config's test datasets
  (``box_ap`` / ``mask_ap``: the first one's; every metric of every dataset under ``results``);
- milliseconds per image of the backbone (``model.backbone.net``, the ViT that ATC changes) and
  of the whole model (preprocessing, backbone, pyramid, heads, postprocessing), timed inside the
  evaluation with forward hooks, the first ``warmup`` forwards of each process excluded,
  ``torch.cuda.synchronize`` around each timed call on a GPU; the mean over the timed images of
  every process;
- backbone GFLOPs: fvcore, counted as ``benchmarks/bench_vitdet_backbone.py`` counts them (the
  clustering replayed, its distance matmul counted), on the first image the main process
  evaluates;
- ``feature_error``: mean over the first ``feature_images`` images of the first test dataset
  (dataset order) of ||f - f_stock|| / ||f_stock||, f the ViT's output feature map and f_stock
  the stock model's on the same input (computed in the same run).

Cells are written to ``results.jsonl`` as they finish (one JSON object per line, with the
sweep's ``settings``); a rerun with the same settings skips finished cells, one with other
settings stops with one error. ``results.md`` and the plots are rewritten after each cell.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

STOCK = "stock"
LINKAGES = ("single", "complete", "average")
DEFAULT_METHODS = ("atc:average", "atc:complete", "atc:single", "tome", "kmedoids", "dpcknn", "random")
RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Cell:
    """One evaluation: ``method`` as given on the command line ("stock", "atc:average", "tome",
    "sec", "sec:2", ...) at ``keep_rate`` (1.0 for stock and SEC, which keep every token)."""

    method: str
    keep_rate: float

    @property
    def key(self) -> tuple[str, float]:
        return (self.method, float(self.keep_rate))

    def label(self) -> str:
        return self.method if self.method == STOCK or self.method.startswith("sec") else \
            f"{self.method} keep {self.keep_rate:g}"


@dataclass
class SweepSpec:
    """Everything a worker process needs (picklable for ``launch``)."""

    lazy: bool
    config_file: str
    opts: list[str]  # the user's overrides plus the weights and output directory
    output: str
    cells: list[Cell]  # the cells still to run
    total: int  # cells of the whole sweep, finished ones included
    atc_arguments: dict[str, dict]  # cell method -> apply_atc arguments but keep_rate
    settings: dict
    feature_images: int
    warmup: int
    command: str = ""
    started: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))


# ---------------------------------------------------------------------------------------------
# Arguments and cells
# ---------------------------------------------------------------------------------------------


def method_choices() -> list[str]:
    """Every method name the sweep takes (registered clustering methods included)."""
    from atc_det.registry import method_names

    names = [f"atc:{linkage}" for linkage in LINKAGES] + ["atc"]
    return names + [n for n in method_names() if n != "atc"] + ["sec", "sec:G"]


def check_method(name: str) -> None:
    """ValueError for a method the sweep does not know."""
    from atc_det.registry import method_names

    kind, colon, option = name.partition(":")
    if kind == "atc" and (not colon or option in LINKAGES):
        return
    if kind == "sec" and (not colon or (option.isdigit() and int(option) >= 1)):
        return
    if kind in method_names() and kind != "atc" and not colon:
        return
    raise ValueError(f"unknown method {name!r}: choose from {', '.join(method_choices())} "
                     "(sec:G: SEC with G groups in global blocks)")


def check_keep_rates(keeps: Iterable[float]) -> None:
    """ValueError for a keep rate outside (0, 1]."""
    for keep in keeps:
        if not (isinstance(keep, (int, float)) and 0 < keep <= 1):  # NaN too
            raise ValueError(f"keep rate {keep!r} is outside (0, 1]: a keep rate is the fraction of "
                             "tokens kept, e.g. --keep 0.75 0.5 0.25")


def check_arguments(args: argparse.Namespace) -> None:
    """The command line's own values (ValueError); ``args.keep`` becomes floats."""
    for flag, value in (("--config-file", args.config_file), ("--weights", args.weights),
                        ("--output", args.output)):
        if not value:
            raise ValueError(f"{flag} is required: python tools/offshelf.py --config-file CFG "
                             "--weights W --output DIR [--keep ...] [--methods ...]")
    for method in args.methods:
        check_method(method)
    try:
        args.keep = [float(k) for k in args.keep]
    except ValueError:
        raise ValueError(f"--keep takes numbers in (0, 1], got {' '.join(args.keep)}") from None
    check_keep_rates(args.keep)
    if args.feature_images < 0 or args.warmup < 0:
        raise ValueError("--feature-images and --warmup take a count >= 0")
    path = os.path.join(args.output, RESULTS)
    check_settings(read_rows(path), sweep_settings(args), path)


def plan_cells(methods: Sequence[str], keeps: Sequence[float]) -> list[Cell]:
    """Stock first, then each method at each keep rate (SEC once: it keeps every token)."""
    cells = [Cell(STOCK, 1.0)]
    for method in dict.fromkeys(methods):
        rates = [1.0] if method.startswith("sec") else list(dict.fromkeys(float(k) for k in keeps))
        cells += [Cell(method, rate) for rate in rates]
    return cells


def cell_arguments(method: str, base: dict, options: dict) -> dict:
    """``apply_atc`` keyword arguments (but ``keep_rate``) of a clustering method: the config's
    own ATC arguments (``base``), the sweep's options, the method and its linkage."""
    kind, _, linkage = method.partition(":")
    arguments = {**base, **{k: v for k, v in options.items() if v is not None}, "method": kind}
    arguments.pop("keep_rate", None)
    if linkage:
        arguments["linkage"] = linkage
    return arguments


def sec_arguments(method: str) -> dict:
    """``apply_sec`` keyword arguments of "sec" (its defaults) or "sec:G"."""
    _, _, groups = method.partition(":")
    return {"global_groups": int(groups)} if groups else {}


def reduce(vit: torch.nn.Module, cell: Cell, atc_arguments: dict[str, dict]) -> None:
    """Set ``vit``'s token reduction to ``cell``'s (stock: none), in place."""
    import atc_det

    atc_det.remove_atc(vit)
    atc_det.remove_sec(vit)
    if cell.method.startswith("sec"):
        atc_det.apply_sec(vit, **sec_arguments(cell.method))
    elif cell.method != STOCK:
        atc_det.apply_atc(vit, keep_rate=cell.keep_rate, **atc_arguments[cell.method])


# ---------------------------------------------------------------------------------------------
# The config (both routes) and the checks before launch
# ---------------------------------------------------------------------------------------------


def route_opts(lazy: bool, opts: Sequence[str], weights: str, output: str) -> list[str]:
    """The user's overrides plus the weights and the output directory, in the config's syntax."""
    if lazy:
        return [*opts, f"train.init_checkpoint='{weights}'", f"train.output_dir='{output}'"]
    return [*opts, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", output]


def load_sweep_config(lazy: bool, config_file: str, opts: Sequence[str]):
    """The config as ``tools/train_net.py`` loads it (overrides checked)."""
    if lazy:
        from atc_det.lazy_trainer import load_lazy_config

        return load_lazy_config(config_file, list(opts))
    from atc_det.engine import load_config

    return load_config(config_file, list(opts))


def config_atc_arguments(cfg, lazy: bool) -> dict:
    """The config's own ``apply_atc`` arguments (its ATC node / ``MODEL.ATC.*`` keys, used or
    not): what each clustering cell starts from."""
    if lazy:
        from omegaconf import OmegaConf

        from atc_det.modeling.lazy import atc_arguments, atc_vit_nodes

        nodes = list(atc_vit_nodes(cfg.model, "model"))
        return atc_arguments(**(OmegaConf.to_container(nodes[0][1].atc) if nodes else {}))
    from atc_det.modeling.atc_vit import atc_arguments_from_cfg

    return atc_arguments_from_cfg(cfg)


def config_depth(cfg, lazy: bool) -> int:
    """The number of ViT blocks the config builds."""
    if not lazy:
        return int(cfg.MODEL.VIT.DEPTH)
    import inspect

    from detectron2.modeling import ViT

    net = cfg.model.get("backbone", {}).get("net")
    if net is None:
        raise ValueError("the config's model has no model.backbone.net: the sweep reduces the "
                         "Detectron2 ViT of a ViTDet model (model.backbone.net)")
    return int(net.get("depth", inspect.signature(ViT).parameters["depth"].default))


def check_evaluator(cfg, lazy: bool) -> None:
    """ValueError for a config that evaluates nothing."""
    if lazy:
        if cfg.dataloader.get("evaluator") is None or cfg.dataloader.get("test") is None:
            raise ValueError("the config has no dataloader.evaluator / dataloader.test: the sweep "
                             "evaluates each cell with the config's evaluator (e.g. "
                             "COCOEvaluator); add one to the config")
    elif not cfg.DATASETS.TEST:
        raise ValueError("the config has no evaluator: DATASETS.TEST is empty; name a test "
                         "dataset, e.g. DATASETS.TEST \"('coco_2017_val',)\"")


def check_cell_arguments(depth: int, atc_arguments: dict[str, dict], keeps: Sequence[float]) -> None:
    """ATC arguments of every clustering cell, checked as ``tools/train_net.py`` checks an ATC
    LazyConfig node (one ValueError naming the method)."""
    from detectron2.config import LazyCall
    from detectron2.modeling import ViT

    from atc_det.modeling.lazy import check_atc_nodes, with_atc

    for method, arguments in atc_arguments.items():
        for keep in keeps:
            node = with_atc(LazyCall(ViT)(depth=depth), keep_rate=keep, **arguments)
            try:
                check_atc_nodes(node, f"--methods {method} --keep {keep:g}")
            except ValueError as error:
                raise ValueError(str(error).replace(".atc: ", ": ", 1)) from None


def sweep_settings(args: argparse.Namespace) -> dict:
    """What a results file's cells depend on, besides their method and keep rate: a rerun with
    other settings must not mix its cells into the file."""
    return {
        "config_file": os.path.abspath(args.config_file),
        "weights": args.weights,
        "overrides": list(args.opts or []),
        "blocks": args.blocks,
        "cluster_blocks": args.cluster_blocks,
        "rel_pos": args.rel_pos,
        "feature_images": args.feature_images,
        "warmup": args.warmup,
    }


# ---------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------


def read_rows(path: str) -> list[dict]:
    """The rows of a results file; a last line cut short by a kill is dropped from the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    rows, good = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):  # no newline after it: the write was cut short
                with open(path, "r+b") as f:
                    f.truncate(good)
                break
            raise ValueError(f"{path} line {number} is not JSON: delete the file or give another "
                             "--output") from None
        good += len(line) + 1
    return rows


def check_settings(rows: list[dict], settings: dict, path: str) -> None:
    """ValueError when the file holds cells of other settings."""
    for row in rows:
        theirs = row.get("settings")
        if theirs != settings:
            theirs = theirs or {}
            differ = [f"{k}: {theirs.get(k)!r} there, {settings.get(k)!r} now"
                      for k in sorted(set(settings) | set(theirs)) if theirs.get(k) != settings.get(k)]
            raise ValueError(f"{path} holds results of other arguments ({'; '.join(differ)}): give "
                             "another --output, or delete the file to start over")


def append_row(path: str, row: dict) -> None:
    """One line, flushed and synced: a kill loses at most the cell in progress."""
    line = json.dumps(row, allow_nan=False) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def finite(value: Any) -> Any:
    """JSON-safe metrics: NaN / inf (e.g. AP of a category absent from the data) -> None."""
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# Measuring one cell
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Forward hooks on the model and its ViT: per-image times of both, the ViT's first input
    (for GFLOPs), and for the feature-error images its outputs (and its inputs until their stock
    features are in ``stock``)."""

    def __init__(self, model: torch.nn.Module, vit: torch.nn.Module, feature_ids: set):
        self.model, self.vit, self.feature_ids = model, vit, feature_ids
        self.device = next(model.parameters()).device
        self.stock: dict[Any, torch.Tensor] = {}
        self.handles: list = []

    def start(self) -> None:
        self.model_times: list[tuple[float, int]] = []  # (seconds, images) per forward
        self.vit_times: list[float] = []
        self.first_input: torch.Tensor | None = None
        self.inputs: dict[Any, torch.Tensor] = {}
        self.features: dict[Any, torch.Tensor] = {}
        self._ids: list = []
        self.handles = [
            self.model.register_forward_pre_hook(self._model_pre),
            self.model.register_forward_hook(self._model_post),
            self.vit.register_forward_pre_hook(self._vit_pre),
            self.vit.register_forward_hook(self._vit_post),
        ]

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _model_pre(self, module, args) -> None:
        batch = args[0] if args else []
        self._ids = [x.get("image_id") for x in batch] if isinstance(batch, list) else []
        _sync(self.device)
        self._model_start = time.perf_counter()

    def _model_post(self, module, args, output) -> None:
        _sync(self.device)
        self.model_times.append((time.perf_counter() - self._model_start, max(len(self._ids), 1)))

    def _vit_pre(self, module, args) -> None:
        x = args[0]
        if self.first_input is None:
            self.first_input = x[:1].detach().clone()
        for index, image_id in enumerate(self._ids):
            if image_id in self.feature_ids and image_id not in self.stock:
                self.inputs[image_id] = x[index:index + 1].detach().clone()
        _sync(self.device)
        self._vit_start = time.perf_counter()

    def _vit_post(self, module, args, output) -> None:
        _sync(self.device)
        self.vit_times.append(time.perf_counter() - self._vit_start)
        feature = next(iter(output.values())) if isinstance(output, dict) else output
        for index, image_id in enumerate(self._ids):
            if image_id in self.feature_ids:
                self.features[image_id] = feature[index:index + 1].detach().float().cpu()

    def timed(self, warmup: int) -> tuple[list[float], list[float]]:
        """Per-image seconds of the model and the ViT, the first ``warmup`` forwards dropped
        (at most all but one, as Detectron2's ``inference_on_dataset`` does)."""
        skip = min(warmup, max(len(self.model_times) - 1, 0))
        model = [s / n for s, n in self.model_times[skip:] for _ in range(n)]
        vit = [s / n for s, (_, n) in zip(self.vit_times[skip:], self.model_times[skip:]) for _ in range(n)]
        return model, vit


def backbone_gflops(vit: torch.nn.Module, image: torch.Tensor) -> float:
    """fvcore GFLOPs of ``vit`` on ``image``, counted by ``benchmarks/bench_vitdet_backbone.py``
    (one forward records the clustering, the count replays it)."""
    from unittest import mock

    try:
        import benchmarks.bench_vitdet_backbone as bench
    except ImportError as error:
        raise ImportError("the GFLOP count needs benchmarks/bench_vitdet_backbone.py: run from the "
                          f"repository (its root on sys.path) ({error})") from error
    # The bench records and replays ``cluster_tokens`` in the module it names ``atc_vit``: the
    # module whose ``cluster_tokens`` the reduced blocks call (none: where it is defined).
    reduced = [type(b).__module__ for b in vit.blocks if hasattr(b, "_atc")]
    module = sys.modules[reduced[0] if reduced else "atc_det.reduction"]
    with mock.patch.object(bench, "atc_vit", module):
        with torch.inference_mode(), bench.ClusterTimer() as timer:
            vit(image)
        return bench.gflops(vit, image, timer.results)


def feature_errors(vit: torch.nn.Module, meter: Meter, restore: Callable[[], None]) -> list[float]:
    """||f - f_stock|| / ||f_stock|| of each feature image this process evaluated; stock
    features not yet in ``meter.stock`` are computed with the reduction removed, then
    ``restore``."""
    import atc_det

    stock = meter.stock
    missing = [i for i in meter.features if i not in stock]
    if missing:
        atc_det.remove_atc(vit)
        atc_det.remove_sec(vit)
        with torch.inference_mode():
            for image_id in missing:
                out = vit(meter.inputs[image_id])
                stock[image_id] = (next(iter(out.values())) if isinstance(out, dict) else out).float().cpu()
        restore()
    return [float((f - stock[i]).norm() / stock[i].norm()) for i, f in meter.features.items()]


def first_dataset_ids(names: Sequence[str], count: int) -> set:
    """Image ids of the first ``count`` images of the first test dataset (dataset order)."""
    from detectron2.data import DatasetCatalog

    if not names or count <= 0:
        return set()
    return {d.get("image_id") for d in DatasetCatalog.get(names[0])[:count]}


def per_dataset(results: dict) -> dict:
    """{dataset: {task: metrics}} from an evaluation's results (one dataset: unnamed)."""
    if not results:
        return {}
    if any(task in results for task in ("bbox", "segm")):
        return {"": results}
    return dict(results)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name or 'CPU'}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# The worker (one per process of launch)
# ---------------------------------------------------------------------------------------------


def build_route(spec: SweepSpec):
    """(model with its weights loaded, evaluate(), test dataset names, seed) as
    ``tools/train_net.py --eval-only`` sets them up."""
    from atc_det.data.datasets import prepare_datasets
    from atc_det.engine import Trainer, build_eval_model, exit_on_bad_input, setup

    args = argparse.Namespace(config_file=spec.config_file, opts=spec.opts, eval_only=True, resume=False)
    if spec.lazy:
        from detectron2.engine import default_setup

        from atc_det.lazy_trainer import build_lazy_eval_model, dataset_names, do_test, load_lazy_config

        cfg = load_lazy_config(spec.config_file, spec.opts)
        default_setup(cfg, args)
        names = dataset_names(cfg, eval_only=True)
        prepare_datasets(names)
        with exit_on_bad_input():
            model = build_lazy_eval_model(cfg)
        return model, lambda: do_test(cfg, model), names, cfg.train.get("seed", 0)
    cfg = setup(args)
    with exit_on_bad_input():
        model = build_eval_model(cfg)
    return model, lambda: Trainer.test(cfg, model), list(cfg.DATASETS.TEST), cfg.SEED


def sweep_worker(spec: SweepSpec) -> None:
    """Evaluate and measure ``spec.cells`` in this process; the main process writes the rows."""
    from detectron2.modeling import ViT
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    model, evaluate, names, seed = build_route(spec)
    vit = getattr(getattr(model, "backbone", None), "net", None)
    if not isinstance(vit, ViT):
        raise TypeError(f"the model's backbone.net is a {type(vit).__name__}, not a Detectron2 ViT: "
                        "the sweep reduces the ViT of a ViTDet model")
    meter = Meter(model, vit, first_dataset_ids(names, spec.feature_images))
    path = os.path.join(spec.output, RESULTS)
    done_before, seconds = spec.total - len(spec.cells), []
    main = comm.is_main_process()
    if main:
        print(f"offshelf: {spec.total} cells, {done_before} already in {path}, {len(spec.cells)} to run",
              flush=True)
    for number, cell in enumerate(spec.cells, 1):
        start = time.perf_counter()
        seed_all_rng((seed if seed is not None and seed >= 0 else 0) + comm.get_rank())
        reduce(vit, cell, spec.atc_arguments)
        meter.start()
        try:
            results = evaluate()
        finally:
            meter.stop()
        eval_seconds = time.perf_counter() - start
        model_s, vit_s = meter.timed(spec.warmup)
        gflops = backbone_gflops(vit, meter.first_input) if main and meter.first_input is not None else None
        errors = feature_errors(vit, meter, lambda: reduce(vit, cell, spec.atc_arguments))
        gathered = comm.gather((model_s, vit_s, errors), dst=0)
        if main:
            model_s, vit_s, errors = (sum((g[i] for g in gathered), []) for i in range(3))
            row = cell_row(spec, cell, results, model_s, vit_s, errors, gflops, eval_seconds,
                           model, comm.get_world_size())
            append_row(path, row)
            seconds.append(time.perf_counter() - start)
            print(progress(cell, row, done_before + number, spec.total, seconds, len(spec.cells) - number),
                  flush=True)
            write_report(read_rows(path), spec.output)
        comm.synchronize()


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cell_row(spec: SweepSpec, cell: Cell, results: dict, model_s: list[float], vit_s: list[float],
             errors: list[float], gflops: float | None, eval_seconds: float, model, world: int) -> dict:
    """The JSON row of a finished cell."""
    datasets = per_dataset(results)
    first = next(iter(datasets.values()), {})
    device = next(model.parameters()).device
    arguments = (sec_arguments(cell.method) if cell.method.startswith("sec") else
                 {} if cell.method == STOCK else {"keep_rate": cell.keep_rate, **spec.atc_arguments[cell.method]})
    return finite({
        "method": cell.method,
        "keep_rate": cell.keep_rate,
        "box_ap": first.get("bbox", {}).get("AP"),
        "mask_ap": first.get("segm", {}).get("AP"),
        "backbone_ms": None if not vit_s else 1e3 * mean(vit_s),
        "model_ms": None if not model_s else 1e3 * mean(model_s),
        "backbone_gflops": gflops,
        "feature_error": mean(errors),
        "feature_images": len(errors),
        "timed_images": len(model_s),
        "eval_s": eval_seconds,
        "arguments": arguments,
        "results": datasets,
        "device": device_name(device),
        "world_size": world,
        "run_started": spec.started,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": spec.command,
        "settings": spec.settings,
    })


def duration(seconds: float) -> str:
    """'1 h 02 min', '3 min 05 s' or '12 s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def progress(cell: Cell, row: dict, done: int, total: int, seconds: list[float], left: int) -> str:
    """One line: cells done out of the total, the cell's numbers, the time left."""
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    eta = duration(left * sum(seconds) / len(seconds)) if left else "0 s"
    return (f"[{done}/{total} cells] {cell.label()}: box AP {number(row['box_ap'], '.2f')}, mask AP "
            f"{number(row['mask_ap'], '.2f')}, model {number(row['model_ms'], '.1f')} ms/image, "
            f"backbone {number(row['backbone_ms'], '.1f')} ms/image, feature error "
            f"{number(row['feature_error'], '.4f')} ({duration(seconds[-1])}); about {eta} left")


# ---------------------------------------------------------------------------------------------
# Report: Markdown table and plots
# ---------------------------------------------------------------------------------------------

PLOTS = ("ap_vs_ms.png", "ap_vs_keep.png")


def _methods(rows: list[dict]) -> list[str]:
    """Methods in the order of their first row, stock first."""
    return list(dict.fromkeys([STOCK] + [r["method"] for r in rows]))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict]) -> str:
    """The table of every row (stock first, then each method by falling keep rate)."""
    stock = next((r for r in rows if r["method"] == STOCK), None)
    last = max(rows, key=lambda r: r["finished"])
    settings = last["settings"]
    lines = [
        "# Off-the-shelf token reduction sweep",
        "",
        f"Config `{os.path.relpath(settings['config_file'])}`, weights `{settings['weights']}`"
        + (f", overrides `{' '.join(settings['overrides'])}`" if settings["overrides"] else "") + ".",
        "Options (None: the config's): "
        + ", ".join(f"{k} {settings[k]}" for k in ("blocks", "cluster_blocks", "rel_pos")) + ".",
        f"Device: {last['device']} ({last['world_size']} process(es)); last cell finished "
        f"{last['finished']}. Command of the last run:",
        "",
        "```",
        last.get("command", ""),
        "```",
        "",
        "AP: the config's evaluator on its first test dataset. ms: mean per image over the evaluated "
        f"images, the first {settings['warmup']} forwards of each process excluded (synchronised on a "
        "GPU); backbone = the ViT (`model.backbone.net`), model = the whole detector's forward. "
        "GFLOPs: fvcore, the ViT on one image (as `benchmarks/bench_vitdet_backbone.py` counts). "
        "Feature error: mean over the first "
        f"{settings['feature_images']} test images of ||f - f_stock|| / ||f_stock|| (ViT output).",
        "",
        "| method | keep rate | box AP | mask AP | box AP vs stock | backbone ms/img | model ms/img "
        "| backbone GFLOPs | feature error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in _methods(rows):
        for r in sorted((r for r in rows if r["method"] == method), key=lambda r: -r["keep_rate"]):
            delta = (r["box_ap"] - stock["box_ap"]) if stock and None not in (r["box_ap"], stock["box_ap"]) else None
            lines.append(
                f"| {method} | {r['keep_rate']:g} | {_fmt(r['box_ap'], '.2f')} | {_fmt(r['mask_ap'], '.2f')} "
                f"| {_fmt(delta, '+.2f')} | {_fmt(r['backbone_ms'], '.1f')} | {_fmt(r['model_ms'], '.1f')} "
                f"| {_fmt(r['backbone_gflops'], '.3g')} | {_fmt(r['feature_error'], '.4f')} |")
    lines += ["", "![AP against ms per image](ap_vs_ms.png)", "", "![AP against keep rate](ap_vs_keep.png)", ""]
    return "\n".join(lines)


def plot_report(rows: list[dict], output: str) -> None:
    """``ap_vs_ms.png`` (box / mask AP against model ms per image, one line per method from the
    stock point) and ``ap_vs_keep.png`` (box AP, mask AP and feature error against keep rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stock = next((r for r in rows if r["method"] == STOCK), None)
    methods = [m for m in _methods(rows) if m != STOCK]
    for name, x_key, metrics, xlabel in (
        ("ap_vs_ms.png", "model_ms", ("box_ap", "mask_ap"), "model ms per image"),
        ("ap_vs_keep.png", "keep_rate", ("box_ap", "mask_ap", "feature_error"), "keep rate"),
    ):
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2))
        for ax, metric in zip(axes, metrics):
            has_stock = stock and stock[x_key] is not None and stock[metric] is not None
            for method in methods:
                points = [(r[x_key], r[metric]) for r in sorted(rows, key=lambda r: -r["keep_rate"])
                          if r["method"] == method and r[x_key] is not None and r[metric] is not None]
                if not points:
                    continue
                if method.startswith("sec"):  # every token kept: one point
                    ax.plot(*zip(*points), "D", fillstyle="none", markersize=8, label=method)
                else:  # each line starts at stock
                    start = [(stock[x_key], stock[metric])] if has_stock else []
                    ax.plot(*zip(*(start + points)), marker="o", label=method)  # by keep rate
            if has_stock:
                ax.plot([stock[x_key]], [stock[metric]], "k*", markersize=12, label="stock")
                ax.axhline(stock[metric], color="gray", linestyle=":", linewidth=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric.replace("_", " ").replace("ap", "AP"))
            if x_key == "keep_rate":
                ax.invert_xaxis()
            ax.grid(alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=8)
        fig.suptitle("off-the-shelf token reduction (no fine-tuning)")
        fig.tight_layout()
        fig.savefig(os.path.join(output, name), dpi=110)
        plt.close(fig)


def compare_markdown(runs: dict[str, list[dict]]) -> str:
    """Box / mask AP of each cell in several results folders (e.g. two trainings) side by side,
    with their spread (max - min) and the loss against each run's own stock row."""
    labels = list(runs)
    every_row = [r for rows in runs.values() for r in rows]
    order = _methods(every_row)
    cells = sorted(dict.fromkeys((r["method"], r["keep_rate"]) for r in every_row),
                   key=lambda cell: (order.index(cell[0]), -cell[1]))
    by_run = {label: {(r["method"], r["keep_rate"]): r for r in rows} for label, rows in runs.items()}
    lines = ["| method | keep rate | " + " | ".join(f"box / mask AP ({label})" for label in labels)
             + " | box AP spread | box AP vs stock (" + ", ".join(labels) + ") |",
             "|---|---|" + "---|" * (len(labels) + 2)]
    for method, keep in cells:
        found = [by_run[label].get((method, keep)) for label in labels]
        boxes = [r["box_ap"] for r in found if r and r["box_ap"] is not None]
        losses = []
        for label, r in zip(labels, found):
            stock = by_run[label].get((STOCK, 1.0))
            losses.append(_fmt(r["box_ap"] - stock["box_ap"], "+.2f") if r and stock
                          and None not in (r["box_ap"], stock["box_ap"]) else "-")
        lines.append(f"| {method} | {keep:g} | " + " | ".join(
            f"{_fmt(r and r['box_ap'], '.2f')} / {_fmt(r and r['mask_ap'], '.2f')}" for r in found)
            + f" | {_fmt(max(boxes) - min(boxes) if len(boxes) > 1 else None, '.2f')} | "
            + ", ".join(losses) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], output: str) -> None:
    """``results.md`` and the plots, from every row of the results file."""
    if not rows:
        return
    tmp = os.path.join(output, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write(markdown(rows))
    os.replace(tmp, os.path.join(output, "results.md"))
    plot_report(rows, output)
