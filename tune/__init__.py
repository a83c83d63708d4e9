"""`rws tune`: hyperparameter search with Ray Tune over the same training path as `rws fit`.

- `space`: the search YAML (base fit config, fixed overrides, search space, budget) and its checks;
- `trial`: one trial, built from a fit config exactly as `rws fit --config` builds it;
- `experiment`: Ray start-up, the Tuner (ASHA, Optuna's TPE, retries) and resuming;
- `results`: the trials table (CSV, markdown) and the best config as a fit YAML;
- `cli`: the `rws tune` command (registered in the `rws.commands` entry-point group).

See docs/tune.md.
"""
