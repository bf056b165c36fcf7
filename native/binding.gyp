{
  "targets": [
    {
      "target_name": "blockd_native",
      "sources": ["blockd_native.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
