"""The web dashboard's files (`static/`), served at `/ui` by shoal.master.ui, which says why
they are plain files with no build step."""
