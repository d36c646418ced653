"""The PyTorch side: export with every BatchNormalization kept, sample networks and users'
`module:factory` models with their checkpoints, training (the BN paper's experiment) and
recalibration. The only package that imports torch: the sample networks (`zoo.nets`) subclass
torch.nn.Module at import, everything else imports torch inside its functions, and the CLI and
the rest of bnfold reach this package only inside the commands that need it.
"""
