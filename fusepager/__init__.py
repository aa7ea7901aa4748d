"""fusepager: external memory managers that keep their pages in real files, shown through FUSE."""
