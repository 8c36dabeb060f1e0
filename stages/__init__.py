"""One thin entry point per dvc.yaml stage: parse params, call the library, write outputs."""
