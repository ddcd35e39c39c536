"""The one orchestration: planes in -> features -> kernel fit -> PCA / HR render -> outputs.

Modules (each imports only those listed before it; ``lint-imports`` forbids cycles):
:mod:`.options` (:class:`PipelineOptions`, :class:`Progress`), :mod:`.planes` (the steps on
planes in memory), :mod:`.tasks` (:class:`SourceRef`, :class:`Task`, :func:`run_task`, the
output-layout writer, :data:`TEST_PAUSE_ENV`), :mod:`.transaction` (the one output
transaction), :mod:`.job` (:func:`plan_job`, :func:`run_job`), :mod:`.results`
(:func:`open_results`). Everything is importable from ``napari_upsample_anything.pipeline``.

Used by the command line (:mod:`.cli`), the napari widgets (``widgets/_pipeline.py`` keeps
only the thread bridge and layer translation) and Python users. No Qt, no napari; torch is
imported lazily.

Steps (each a plain function, shared by every caller)
------------------------------------------------------
:func:`fit_plane`
    features of one ``Y x X`` plane (a ViT, DINOv2 by default) and the GSJBU kernel field
    fitted on it (the plane's image is the guide).
:func:`fit_basis`
    the one PCA policy: a 3-component basis fitted on the **LR features** of all planes of
    an image pooled together (so colours mean the same on every slice), on a seeded random
    subsample of at most ``options.pca_max_samples`` positions (default 100,000, seed 0).
:func:`render_plane_pca` / :func:`render_plane_features`
    the HR PCA picture (3 rendered projections: exact and cheap) and the ``(C, H, W)`` HR
    features, written tile by tile into any target supporting ``out[:, y0:y1, x0:x1] = tile``
    (numpy array, memmap, :class:`~.omezarr.BandWriter` over a zarr array).
:func:`upsample_map`
    any LR map (probabilities, one-hot labels, depth) rendered with a plane's kernels.

In memory: :func:`run_planes` (what the widgets call) runs the steps over a list of planes
and returns :class:`PlaneFit` objects and the basis.

Files: tasks, for any executor
------------------------------
A job over one image source (file or array with named axes, :mod:`.sources`) writing into
one output folder is planned as picklable, frozen :class:`Task` objects::

    job = plan_job(source_ref, options, out_dir)     # nothing computed yet
    job.prepare()                                     # makes the hidden temporary folder
    for stage in job.stages():                        # tasks of a stage are independent
        for task in stage:
            run_task(task, progress=None, cancel=None)    # -> dict summary; any process
    job.commit()                                      # renames the folder into place
    # on any error or Ctrl-C: job.abort() removes the temporary folder

or simply ``run_job(job)`` (``run_job(job, client="local" | address | Client)`` runs the
stages on Dask workers, through the same :func:`~..distributed.execute`). A task names its source (:class:`SourceRef`: path / array, axes,
scene), its plane ``(t, z)``, the options and the temporary output folder; :func:`run_task`
opens the source lazily, reads only its plane and writes its results straight into its region
of the output stores. Stages: 0 = ``"fit"`` per plane (features + kernels, small files);
1 = ``"layout"`` (one task: PCA basis, creates the OME-Zarr stores with their final shapes);
2 = ``"render"`` per plane (HR features and PCA into the plane's region); 3 = ``"finish"``
(one task: pyramid, report). A Dask executor runs the tasks of a stage in parallel and the
stages in order (``task.stage``); the serial path is ``for t in job.tasks: run_task(t)``.

Outputs (``format="ome-zarr"``, the default): ``features.ome.zarr`` (HR features,
``[t,] c, [z,] y, x``, chunked), ``pca.ome.zarr`` (the HR PCA as 3 channels with a
multiscale pyramid), ``kernels.ome.zarr`` (sigma_x, sigma_y, theta, sigma_r on the LR grid,
with the fit metadata), ``lr_features.ome.zarr``, ``pca.png`` (one plane: LR | HR) and
``report.json``. Pixel sizes: HR the image's, LR scaled by ``H/h``, ``W/w``.
``format="npy"``: ``features_hr.npy`` (``(C, H, W)``, or ``(planes, C, H, W)``), ``pca.png``,
``kernels.npz`` (``kernels_t{t}_z{z}.npz`` for stacks) and ``report.json``.
"""

from ..distributed import TaskFailedError, TaskInputError, dask_client, worker_memory_limit
from .job import Job, plan_job, run_job
from .options import (
    FIT_DOWNSAMPLE,
    FORMATS,
    HR_DTYPES,
    MAX_GUIDE_SMOOTHING,
    MAX_LABEL_CLASSES,
    OPTION_RECORDS,
    PRECISIONS,
    CancelFn,
    FeatureOptions,
    JobOptions,
    KernelFitOptions,
    OutputOptions,
    PipelineOptions,
    PlaneKey,
    Progress,
    ProgressCallback,
    core_progress,
)
from .planes import (
    PlaneFit,
    argmax_labels,
    fit_basis,
    fit_plane,
    map_kind,
    one_hot,
    render_plane_features,
    render_plane_pca,
    run_planes,
    upsample_map,
)
from .results import open_results
from .tasks import TEST_PAUSE_ENV, SourceRef, Task, describe_map_task, describe_task, run_task
from .transaction import OutputTransaction

#: The names the job failures had before they became one type (``pipeline_dask`` in 1d9ea88).
JobTaskError = TaskFailedError
JobInputError = TaskInputError

__all__ = [
    "CancelFn",
    "FIT_DOWNSAMPLE",
    "FORMATS",
    "FeatureOptions",
    "HR_DTYPES",
    "JobOptions",
    "KernelFitOptions",
    "OPTION_RECORDS",
    "OutputOptions",
    "Job",
    "JobInputError",
    "JobTaskError",
    "MAX_GUIDE_SMOOTHING",
    "MAX_LABEL_CLASSES",
    "OutputTransaction",
    "PRECISIONS",
    "PipelineOptions",
    "PlaneFit",
    "PlaneKey",
    "Progress",
    "ProgressCallback",
    "SourceRef",
    "TEST_PAUSE_ENV",
    "Task",
    "TaskFailedError",
    "TaskInputError",
    "argmax_labels",
    "core_progress",
    "dask_client",
    "describe_map_task",
    "describe_task",
    "fit_basis",
    "fit_plane",
    "map_kind",
    "one_hot",
    "open_results",
    "plan_job",
    "render_plane_features",
    "render_plane_pca",
    "run_job",
    "run_planes",
    "run_task",
    "upsample_map",
    "worker_memory_limit",
]
