"""`make report`: the pull-request report (params, metrics and plots of the workspace vs a base)."""
