"""Storage: crash-safe files, confinement to the run directory, JSON reading, the run lock, exports and
checkpoint files.

Below the core: it knows nothing of monitors, tasks or sinks."""
