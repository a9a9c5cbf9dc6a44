raise RuntimeError("gamma cannot start: its config is missing")
