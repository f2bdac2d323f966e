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

# Public name -> defining module; imported on first use (see tftransfer.lazy).
_EXPORTS = {
    "cached_pipeline": "tftransfer.distill.cache",
    "load_or_compute": "tftransfer.distill.cache",
    "teacher_outputs": "tftransfer.distill.cache",
    "Distiller": "tftransfer.distill.distiller",
    "HintonDistillation": "tftransfer.distill.distiller",
    "init_from_teacher": "tftransfer.distill.student_init",
    "compare": "tftransfer.distill.report",
    "latency_per_example": "tftransfer.distill.report",
    "DistillationSchedule": "tftransfer.distill.schedule",
    "schedule_value": "tftransfer.distill.schedule",
    "Teacher": "tftransfer.distill.teacher",
    "check_compatible": "tftransfer.distill.teacher",
    "ensemble": "tftransfer.distill.teacher",
    "load_teacher": "tftransfer.distill.teacher",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
