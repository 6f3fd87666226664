"""Models, workloads, capture and the TraceSet store."""
