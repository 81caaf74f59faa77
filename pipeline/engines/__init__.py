"""Engine contracts: which engine loads which checkpoint on which GPU, and the tensors a unified checkpoint must hold (export rules). Data cited from the engines' own source."""
