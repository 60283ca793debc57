"""The few pieces every op shares: backend resolution (``backends``), tensor helpers
such as the accumulation dtype and the None <-> empty conversions (``tensors``),
argument checks (``validation``) and the C++ extension glue of the cpu backends
(``cpu_extension``, imported only by them since it needs the built extension)."""
