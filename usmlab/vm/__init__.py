"""The lab VM: settings, provisioning scripts, the Vagrant wrapper and the local test box."""
