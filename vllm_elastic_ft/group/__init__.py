"""The DP group's failure handling: state machine, epoch fencing, controller, hooks."""
