"""Running the app on one machine: a private local Ray and Serve that this process starts and
stops (`launcher`), the HTTP front in front of the ingress (`front`), process bookkeeping
(`processes`) and the command line (`cli`)."""
