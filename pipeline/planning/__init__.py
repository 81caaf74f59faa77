"""The recipe front door: every check before compute, the plans of a recipe's targets, plan.yaml and the generated dvc.yaml tail."""
