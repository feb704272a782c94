"""An rltk env plugin: route support tickets to the team that owns them."""
