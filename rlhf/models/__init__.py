"""The models: loading, the critic, per-action outputs, generation and the built-in tiny actor."""
