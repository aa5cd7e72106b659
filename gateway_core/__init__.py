"""Framework-free domain of jobgate: settings, models, the job state machine, the service catalog."""
