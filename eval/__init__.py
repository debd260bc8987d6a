"""Evaluation: closed-loop driving in highway-env (installed as `unified.eval`)."""
