# One module per `libra` sub-command (and DVC stage).
