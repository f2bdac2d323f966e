"""Knowledge distillation: teacher (or ensemble) -> smaller student.

Built on `keras.distillation` (Keras >= 3.12): `Distiller` subclasses
`keras.distillation.Distiller`, hints use `keras.distillation.
FeatureDistillation`. What tftransfer adds: dict (`{head: logits}`) outputs,
alpha / temperature as variables moved by `DistillationSchedule`, cached
teacher outputs, teacher ensembles, input-compatibility checks, and
`python -m tftransfer.distill` (see `__main__.py` and README.md, "Knowledge distillation").

Library use (no config needed):

```python
teacher = tftransfer.distill.load_teacher(["runs/teacher"])
distiller = tftransfer.distill.Distiller(teacher.model, student, heads, alpha=0.1, temperature=4.0)
distiller.compile(keras.optimizers.Adam(1e-3), metrics={"label": ["accuracy"]})
distiller.fit(train_ds, epochs=3, callbacks=[tftransfer.distill.DistillationSchedule(...)])
```
"""

from tftransfer.lazy import lazy_exports

# Defining module -> its public names; imported on first use (see tftransfer.lazy).
_MODULES = {
    "tftransfer.distill.cache": ("cached_pipeline", "load_or_compute", "teacher_outputs"),
    "tftransfer.distill.distiller": ("Distiller", "HintonDistillation"),
    "tftransfer.distill.student_init": ("init_from_teacher",),
    "tftransfer.distill.report": ("compare", "latency_per_example"),
    "tftransfer.distill.schedule": ("DistillationSchedule", "schedule_value"),
    "tftransfer.distill.teacher": ("Teacher", "check_compatible", "ensemble", "load_teacher"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _MODULES, globals())
