"""The application: the composition root (build), the run loop and the Hydra job."""
