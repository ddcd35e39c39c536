"""The options records (#21): each field and its check are written once, in one record, and
the pipeline's options, the CLI and the widget's run config are built from those records."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import fields

import pytest

from napari_upsample_anything import api
from napari_upsample_anything.cli_options import options_from_args
from napari_upsample_anything.cli_printing import UsageError
from napari_upsample_anything.core.units import budget_or_none, no_budget
from napari_upsample_anything.pipeline import (
    OPTION_RECORDS,
    FeatureOptions,
    JobOptions,
    KernelFitOptions,
    OutputOptions,
    PipelineOptions,
)
from napari_upsample_anything.widgets._pipeline import RunConfig


def _names(cls) -> list:
    return [f.name for f in fields(cls)]


def test_the_pipeline_options_are_the_records_fields_each_once():
    from_records = [name for record in OPTION_RECORDS for name in _names(record)]
    assert len(set(from_records)) == len(from_records), "a field is in two records"
    assert _names(PipelineOptions) == from_records


@pytest.mark.parametrize(
    "record, bad, flag",
    [
        (FeatureOptions, {"layer": (1, 1)}, "--layer"),
        (FeatureOptions, {"input_size": 0}, "--input-size"),
        (FeatureOptions, {"channels": (-1,)}, "--channels"),
        (KernelFitOptions, {"steps": -1}, "--steps"),
        (KernelFitOptions, {"guide_smoothing": -1.0}, "--guide-smoothing"),
        (KernelFitOptions, {"fit_downsample": "nearest"}, "--fit-downsample"),
        (KernelFitOptions, {"fit_fraction": 0.0}, "--fit-fraction"),
        (OutputOptions, {"precision": "fp64"}, "--precision"),
        (OutputOptions, {"hr_dtype": "int8"}, "--dtype"),
        (OutputOptions, {"format": "tiff"}, "--format"),
        (OutputOptions, {"pca_max_samples": 2}, "--pca-samples"),
        (JobOptions, {"device": "tpu"}, "--device"),
        (JobOptions, {"max_memory": "lots"}, "--max-memory"),
    ],
)
def test_each_record_checks_its_fields_and_the_pipeline_options_use_that_check(record, bad, flag):
    with pytest.raises(ValueError, match=flag) as own:
        record(**bad).validate()
    with pytest.raises(ValueError, match=flag) as composed:
        PipelineOptions(**bad).validate()
    assert str(own.value) == str(composed.value)
    record().validate()  # the defaults pass


def test_the_records_of_pipeline_options_hold_their_values():
    opts = PipelineOptions(backbone="dinov2_vitb14", steps=7, precision="fp16", device="cpu", max_memory="auto")
    assert opts.features == FeatureOptions(backbone="dinov2_vitb14")
    assert opts.fit == KernelFitOptions(steps=7)
    assert opts.outputs == OutputOptions(precision="fp16")
    assert opts.job == JobOptions(device="cpu", max_memory="auto")
    assert opts.budget is None and PipelineOptions(max_memory="2GB").budget == "2GB"


def test_every_fit_option_but_the_seed_is_an_argument_of_fit_kernels():
    params = inspect.signature(api.fit_kernels).parameters
    args = KernelFitOptions(steps=3, guide_smoothing=1.5, fit_downsample="area", fit_fraction=0.5).fit_kernels_args()
    assert args == {"steps": 3, "guide_smoothing": 1.5, "downsample": "area", "fit_fraction": 0.5}
    assert set(args) <= set(params)
    assert len(args) == len(fields(KernelFitOptions)) - 1  # the seed is the pipeline's


@pytest.mark.parametrize("value", [None, "", "auto", "AUTO"])
def test_the_no_budget_rule(value):
    assert no_budget(value) and budget_or_none(value) is None


@pytest.mark.parametrize("value", ["2GB", 10**9, " "])
def test_a_budget_is_kept(value):
    assert not no_budget(value) and budget_or_none(value) == value


def _args(**flags):
    base = {"steps": 50, "device": "cpu", "precision": "auto", "max_memory": None}
    base.update(flags)
    return argparse.Namespace(**base)


def test_the_cli_takes_every_option_whose_flag_dest_is_the_field_name():
    opts = options_from_args(_args(steps=3, guide_smoothing=1.5, fit_fraction=0.5, input_size=98, dtype="float16"), (0, 2))
    assert (opts.steps, opts.guide_smoothing, opts.fit_fraction, opts.input_size) == (3, 1.5, 0.5, 98)
    assert (opts.hr_dtype, opts.channels, opts.pretrained, opts.hr_features) == ("float16", (0, 2), True, True)
    # options without a flag in this command keep their defaults
    assert (opts.fit_downsample, opts.seed, opts.format) == ("bicubic", 0, "ome-zarr")
    opts = options_from_args(_args(random_weights=True, pca_only=True, channels="0,2"))
    assert (opts.pretrained, opts.hr_features, opts.channels) == (False, False, None)
    with pytest.raises(UsageError, match="--fit-fraction"):
        options_from_args(_args(fit_fraction=2.0))


def test_the_widget_config_is_the_pipeline_options_plus_the_storage_mode():
    cfg = RunConfig(steps=2, device="cpu", hr_features="none", max_memory="")
    assert (cfg.steps, cfg.device, cfg.hr_features, cfg.budget) == (2, "cpu", "none", None)
    opts = cfg.options()
    assert opts == PipelineOptions(steps=2, device="cpu", hr_features=False, max_memory=None)
    cfg.steps = 5  # the widgets change a setting of a finished run's config
    cfg.hr_features = "memory"
    assert cfg.options() == PipelineOptions(steps=5, device="cpu", hr_features=True, max_memory=None)
    assert cfg.to_dict()["hr_features"] == "memory" and cfg == RunConfig(
        steps=5, device="cpu", hr_features="memory", max_memory=""
    )
    with pytest.raises(ValueError, match="--fit-fraction"):
        RunConfig(fit_fraction=0.0).validate()
    with pytest.raises(ValueError, match="hr_features"):
        RunConfig(hr_features="disk").validate()
    with pytest.raises(TypeError):
        RunConfig(radius_typo=3)
    with pytest.raises(AttributeError):
        cfg.radius_typo = 3


def test_a_refit_takes_the_fit_options_the_field_records():
    from types import SimpleNamespace

    from napari_upsample_anything.core.field import FitOptions

    fitted = SimpleNamespace(
        options=FitOptions(guide_smoothing=2.0, downsample="area", steps=7), meta={"fit_fraction": 0.25, "seed": 9}
    )
    fit = KernelFitOptions.fitted_with(fitted, steps=3)
    assert fit == KernelFitOptions(steps=3, guide_smoothing=2.0, fit_downsample="area", fit_fraction=0.25)
    legacy = SimpleNamespace(options=None, meta={"guide_smoothing": 1.5})  # saved without options
    assert KernelFitOptions.fitted_with(legacy) == KernelFitOptions(guide_smoothing=1.5)


def test_a_classifier_records_the_fit_options_and_reads_them_back():
    fit = KernelFitOptions(steps=7, guide_smoothing=1.5, fit_downsample="area", fit_fraction=0.5, seed=3)
    saved = fit.settings()
    assert saved == {"steps": 7, "guide_smoothing": 1.5, "fit_downsample": "area", "fit_fraction": 0.5}
    assert PipelineOptions(**KernelFitOptions.from_settings(saved)).fit == KernelFitOptions(**saved)
    assert KernelFitOptions.from_settings({}) == KernelFitOptions.from_settings(KernelFitOptions().settings())
