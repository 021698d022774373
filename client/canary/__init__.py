"""``fedvox-audit canary``: measure privacy empirically with canaries, in one training run.

Steinke, Nasr and Jagielski (2023): hide m canaries in a training, each IN with probability 1/2,
score each one afterwards, guess IN/OUT for the most confident, and turn the count of right
guesses into an epsilon lower bound. ``whitebox`` (gradient canaries in the DP optimizer),
``blackbox`` (random-token s1 examples), ``guesses`` (scores to a bound), ``run`` (the training),
``report`` (table and JSON), ``spec`` (what one audit trains). Import from the modules:
the package itself stays light so ``fedvox-audit --help`` does not load torch.
"""
