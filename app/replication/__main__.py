from app.replication.process import main

main()
